"""Build tests/support/other_hook.c, a do-nothing PEP 523 hook (for the chaining test and
as the overhead benchmark's floor)."""
import importlib.util
import os
import shutil
import subprocess
import sysconfig

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "other_hook.c")


def build_other_hook(directory):
    """Compile and import the module into ``directory``; None when there is no C compiler."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        return None
    out = os.path.join(directory, "other_hook" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run([*cc, "-shared", "-fPIC", "-O2", f"-I{include}", f"-I{include}/internal",
                    SOURCE, "-o", out], check=True)
    spec = importlib.util.spec_from_file_location("other_hook", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
