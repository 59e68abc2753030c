"""Replace TRL's public trainer and config classes by trl_regularizers' subclasses."""

from __future__ import annotations

from types import ModuleType

# TRL public name -> trl_regularizers public name
SWAPS: dict[str, str] = {
    "DPOTrainer": "RegularizedDPOTrainer",
    "DPOConfig": "RegularizedDPOConfig",
    "RewardTrainer": "RegularizedRewardTrainer",
    "RewardConfig": "RegularizedRewardConfig",
    "GRPOTrainer": "RegularizedGRPOTrainer",
    "GRPOConfig": "RegularizedGRPOConfig",
    "RLOOTrainer": "RegularizedRLOOTrainer",
    "RLOOConfig": "RegularizedRLOOConfig",
    "SFTTrainer": "RegularizedSFTTrainer",
    "SFTConfig": "RegularizedSFTConfig",
}


def swap_trl_classes(trl_module: ModuleType | None = None, package: ModuleType | None = None) -> list[str]:
    """Set each TRL name of :data:`SWAPS` on ``trl`` (and ``trl.trainer``) to our class; return the swapped names.

    Our classes are resolved first, so they subclass TRL's real classes; only the names a test module imports
    afterwards (``from trl import DPOTrainer``) change. A pair whose class is not our subclass of TRL's is refused.
    """
    import trl_regularizers

    if trl_module is None:
        import trl as trl_module
    package = package or trl_regularizers
    targets = [trl_module]
    trainer_namespace = getattr(trl_module, "trainer", None)
    if isinstance(trainer_namespace, ModuleType):
        targets.append(trainer_namespace)
    swapped = []
    for trl_name, our_name in SWAPS.items():
        original = getattr(trl_module, trl_name)
        ours = getattr(package, our_name)
        if not (isinstance(ours, type) and issubclass(ours, original) and ours is not original):
            raise TypeError(f"trl_regularizers.{our_name} is not a subclass of trl.{trl_name}")
        for target in targets:
            setattr(target, trl_name, ours)
        swapped.append(trl_name)
    return swapped
