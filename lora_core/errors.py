"""The one error type for mistakes a user can fix.

A `UserError` names the field (or file) at fault and says what to do; the job reports it as an `error`
event with that `field`, and the page shows it beside the field. Anything else that goes wrong is a fault
of the program or the machine and is reported with its type.
"""

from __future__ import annotations


class UserError(ValueError):
    """A config, dataset, model, output folder, optimizer, resume or upload problem the user can fix."""

    field: str = "config"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


class FieldConflict(ValueError):
    """A rule between fields, raised from a config model validator: each field in `fields` is reported with it.
    (Here rather than in config.py so that the option modules config.py inherits can raise it too.)"""

    def __init__(self, fields: tuple[str, ...], message: str):
        self.fields = fields
        super().__init__(message)
