# PyInstaller hook for hivemind.
# - Its submodules are imported by name at run time (the vendored multiaddr codecs: importlib by name).
# - Keep its Python source next to the bytecode: parts of it go through TorchScript, which reads source.
# - p2pd (the libp2p daemon, a Go binary) must arrive as an executable file where hivemind looks for it.
import os

from PyInstaller.utils.hooks import collect_data_files, collect_submodules, get_package_paths

hiddenimports = collect_submodules("hivemind")
module_collection_mode = "pyz+py"

_, _package_dir = get_package_paths("hivemind")
_p2pd = os.path.join(_package_dir, "hivemind_cli", "p2pd")
binaries = [(_p2pd, "hivemind/hivemind_cli")]
datas = collect_data_files("hivemind", excludes=["**/p2pd"])
