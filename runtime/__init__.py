"""The fxpress::* custom ops (schema, reference kernel, fake kernel) and the runners for artifacts.

Importing this package registers every op in the table `fxpress.runtime.ops.OPS`.
"""

from fxpress.runtime import (  # noqa: F401  (each module defines its ops on import)
    embedding,  # fxpress::embedding_nbit
    hadamard,  # fxpress::hadamard
    moe_quant,  # fxpress::grouped_linear_nbit
    quant,  # fxpress::linear_nbit, fxpress::quantize_act
    threshold,  # fxpress::threshold_linear
)
