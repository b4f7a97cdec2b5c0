from megatron_patch.convert.cli import main
from megatron_patch.process_lifetime import exit_without_teardown

if __name__ == "__main__":
    # Its outputs are complete (renamed into place) when main returns; an exception keeps the normal exit.
    exit_without_teardown(main() or 0)
