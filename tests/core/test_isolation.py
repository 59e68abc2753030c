"""trl_regularizers.core is pure math: importing it must not import trl or transformers."""

import subprocess
import sys


def test_core_imports_neither_trl_nor_transformers():
    code = (
        "import sys, trl_regularizers.core as core, trl_regularizers.core.full_kl, trl_regularizers.core.margins, trl_regularizers.core.ppo, trl_regularizers.core.reward_aware; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers', 'accelerate', 'datasets')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"core imported: {result.stdout} {result.stderr}"
