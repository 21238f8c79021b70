"""Values that follow a schedule over training steps: the aux-loss coefficient ("tight to
loose", paper section 3.4, ``adamoe_aux_loss_coeff_schedule``) and the target load
(``adamoe_target_load_schedule``).

Specification strings:

    constant:0.01                    0.01 at every step
    piecewise:0.1,1000:0.01          0.1 from step 0, 0.01 from step 1000 (any number of pieces)
    linear:0.1,0.01,2000             0.1 at step 0 decaying linearly to 0.01 at step 2000, then flat
    linear:0.1,0.01,2000,500         the same, holding 0.1 until step 500 and decaying from there

Pure Python; parsing errors raise ``OptionError`` (a ``ValueError``) naming the field and spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_adamoe.errors import OptionError

SCHEDULE_KINDS = ("constant", "piecewise", "linear")


@dataclass(frozen=True)
class StepSchedule:
    """A value as a function of the training step (0-based)."""

    kind: str
    values: tuple[float, ...]
    steps: tuple[int, ...]

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "piecewise":
            value = self.values[0]
            for start, piece_value in zip(self.steps, self.values):
                if step >= start:
                    value = piece_value
            return value
        start_value, end_value = self.values
        start_step, end_step = self.steps
        if step <= start_step:
            return start_value
        if step >= end_step:
            return end_value
        fraction = (step - start_step) / (end_step - start_step)
        return start_value + fraction * (end_value - start_value)

    @property
    def max_value(self) -> float:
        return max(self.values)

    @classmethod
    def constant(cls, value: float) -> "StepSchedule":
        return cls("constant", (float(value),), (0,))

    @classmethod
    def parse(cls, spec: str, field: str = "adamoe_aux_loss_coeff_schedule") -> "StepSchedule":
        """Parse a specification string (see the module docstring); ``field`` names the option
        in error messages."""
        hint = (
            "use 'constant:C', 'piecewise:C0,STEP1:C1,...' or "
            "'linear:START,END,END_STEP[,START_STEP]'"
        )
        kind, sep, body = str(spec).partition(":")
        kind = kind.strip()
        if not sep or kind not in SCHEDULE_KINDS or not body.strip():
            raise OptionError(f"{field} ({spec!r}) is not a schedule; {hint}")
        try:
            parts = [part.strip() for part in body.split(",")]
            if kind == "constant" and len(parts) == 1:
                schedule = cls.constant(float(parts[0]))
            elif kind == "piecewise":
                values, steps = [float(parts[0])], [0]
                for part in parts[1:]:
                    step, _, value = part.partition(":")
                    steps.append(int(step))
                    values.append(float(value))
                if any(b <= a for a, b in zip(steps, steps[1:])):
                    raise ValueError("steps must increase")
                schedule = cls("piecewise", tuple(values), tuple(steps))
            elif kind == "linear" and len(parts) in (3, 4):
                start_step = int(parts[3]) if len(parts) == 4 else 0
                end_step = int(parts[2])
                if end_step <= start_step:
                    raise ValueError("END_STEP must exceed START_STEP")
                schedule = cls("linear", (float(parts[0]), float(parts[1])), (start_step, end_step))
            else:
                raise ValueError("wrong number of fields")
        except ValueError as error:
            raise OptionError(f"{field} ({spec!r}) is malformed ({error}); {hint}") from None
        if any(value < 0 for value in schedule.values):
            raise OptionError(f"{field} ({spec!r}) has a negative value; values must be >= 0")
        return schedule
