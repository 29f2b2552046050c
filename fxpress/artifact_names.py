"""The file names and markers of every fxpress artifact, defined once.

Writers (serialize, the lowerings, recipes), runners and the atomic writer (which must recognise what fxpress
wrote before it replaces anything) all read them here, in the core, so no layer keeps a copy.
"""

PROGRAM_FORMAT = "fxpress-program"  # "format" in a saved program's manifest
PROGRAM_MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "fxpress"  # "format" in an ONNX model's metadata and a TVM artifact's manifest
METADATA_KEY = "fxpress.info"  # ONNX metadata_props key holding the artifact metadata as JSON
TVM_MANIFEST = "fxpress.json"  # a TVM artifact directory's manifest
NETLIST_FORMAT = "fxpress-fpga-netlist"
NETLIST_FILE = "netlist.json"  # the netlist an FPGA/HLS export directory holds
RECIPE_KEY = "fxpress_recipe"  # the key (holding the recipe format) that marks a recipe file

# marker file of each fxpress artifact directory -> its "format" value
DIR_MARKERS = {PROGRAM_MANIFEST: PROGRAM_FORMAT, TVM_MANIFEST: ARTIFACT_FORMAT, NETLIST_FILE: NETLIST_FORMAT}
