"""Inference entry point.

Usage:
    python -m infer predict runs=RUN[,RUN...] csv=test.csv sample_submission=... out=submission.csv
    python -m infer predict --help
"""
import sys

COMMANDS = {"predict": "infer.predict"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        asked_for_help = sys.argv[1:2] in (["-h"], ["--help"], ["help"])
        print(__doc__.strip() + f"\n\ncommands: {', '.join(COMMANDS)}", file=sys.stdout if asked_for_help else sys.stderr)
        raise SystemExit(0 if asked_for_help else 2)
    import importlib

    from data.config import run_cli

    command = importlib.import_module(COMMANDS[sys.argv[1]])
    run_cli(lambda: command.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
