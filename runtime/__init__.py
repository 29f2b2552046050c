"""The fxpress::* custom ops (schema, reference kernel, fake kernel) and the runners for artifacts."""
from fxpress.runtime import quant  # noqa: F401,E402  (fxpress::linear_nbit, fxpress::quantize_act)
from fxpress.runtime import hadamard  # noqa: F401,E402  (fxpress::hadamard)
from fxpress.runtime import threshold  # noqa: F401,E402  (fxpress::threshold_linear)
