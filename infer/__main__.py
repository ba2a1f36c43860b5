"""Inference entry point: dispatches `python -m infer <command>` to the module that owns the command.

Usage:
    python -m infer predict runs=RUN[,RUN...] csv=test.csv sample_submission=... out=submission.csv
    python -m infer ensemble ...   combine OOF/test prediction files; weights, temperature, stacking
    python -m infer plan ...       estimate the wall time of a prediction job before running it
    python -m infer report ...     Markdown + PNG report for OOF files
    python -m infer kaggle ...     Kaggle entry: exported dataset -> submission.csv (see python -m train.export)
    python -m infer <command> --help
"""
import sys

COMMANDS = {
    "predict": "infer.predict",
    "ensemble": "infer.ensemble",
    "plan": "infer.plan",
    "report": "infer.report",
    "kaggle": "infer.kaggle",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        asked_for_help = sys.argv[1:2] in (["-h"], ["--help"], ["help"])
        print(__doc__.strip() + f"\n\ncommands: {', '.join(COMMANDS)}", file=sys.stdout if asked_for_help else sys.stderr)
        raise SystemExit(0 if asked_for_help else 2)
    import importlib

    from cli.config import run_cli

    command = importlib.import_module(COMMANDS[sys.argv[1]])
    run_cli(lambda: command.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
