"""Skip markers for tests that need a particular TRL line (CI tests every supported TRL release: scripts/test.sh)."""

import pytest
import trl
from packaging.version import Version

TRL_VERSION = Version(trl.__version__)
HAS_PPO = TRL_VERSION < Version("1.13")

requires_trl_ppo = pytest.mark.skipif(
    not HAS_PPO, reason=f"needs TRL < 1.13 (trl.experimental.ppo); this environment has TRL {trl.__version__}. Covered by the TRL 1.12 run."
)
