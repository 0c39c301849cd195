"""``python -m clair_cli`` runs the command-line interface."""

from clair_cli.cli import main

if __name__ == "__main__":
    main()
