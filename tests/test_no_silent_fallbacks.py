"""A broken module fails loudly instead of switching a feature off (issue 17, item 5)."""
import subprocess
import sys


def test_trainer_does_not_swallow_a_broken_checkpoint_module():
    """The trainer used to catch ImportError from hecate.train.checkpoint and run without
    checkpoints; now the import error reaches the user."""
    code = ("import sys; sys.modules['hecate.train.checkpoint'] = None\n"  # makes the import raise
            "try:\n    import hecate.train.trainer\nexcept ImportError as e:\n    print('raised', e)\n"
            "else:\n    print('swallowed')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("raised") and "hecate.train.checkpoint" in out, out


def test_trainer_holds_the_checkpoint_module():
    import hecate.train.checkpoint as checkpoint
    import hecate.train.trainer as trainer

    assert trainer.checkpoint is checkpoint and not hasattr(trainer, "_checkpoint_module")
