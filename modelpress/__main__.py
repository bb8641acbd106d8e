"""``python -m modelpress`` runs the command-line tool."""

from modelpress.cli.main import run

if __name__ == "__main__":
    run()
