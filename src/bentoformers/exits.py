"""What every command ends with: its exit codes, and the error for a problem the user can fix."""

# Exit codes, also listed in `bentoformers --help`.
OK, FAILED, USAGE = 0, 1, 2


class CliError(Exception):
    """A problem the user can fix; the message says how. Exits with code 2."""
