"""`python -m hecate.train CONFIG [--set k=v ...] [--resume]`: one rank of a run (under torchrun)."""
from hecate.cli import main

if __name__ == "__main__":
    import sys
    import warnings

    # torch deprecates all_gather_into_tensor; the runtime still uses it (harmless).
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")

    raise SystemExit(main(["train", "--worker", *sys.argv[1:]]))
