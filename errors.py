"""The one error a user sees: bad input, a bad flag, or a device or precision that cannot be had
here. ``utils.run_cli`` shows it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (missing folder, corrupt file, wrong flag): shown as one line, exit code 2."""
