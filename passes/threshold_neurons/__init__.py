"""ThresholdNeurons: replace chosen linear(+ReLU) layers by multiplication-free threshold neurons."""

from fxpress.passes.threshold_neurons.fine_tune import FineTuning
from fxpress.passes.threshold_neurons.threshold_neurons import ThresholdNeurons

__all__ = ["FineTuning", "ThresholdNeurons"]
