"""Callbacks of both kinds, called at the trainer's events.

- transformers ``TrainerCallback`` objects (or classes): ``on_train_begin``, ``on_step_end``,
  ``on_log``, ``on_evaluate``, ``on_save``, ``on_train_end`` are called as the HF Trainer calls
  them, ``(args, state, control, **kwargs)``; ``control.should_training_stop`` ends the run after
  the current step (the final evaluation and ``final/`` still happen, as in transformers).
- sdpo's own style: any object with ``on_step_end(trainer, metrics)``,
  ``on_evaluate(trainer, metrics)`` or ``on_train_end(trainer)``.

Which kind an object is gets decided once, up front, so a wrong object fails when the trainer is
built, not after the first evaluation.
"""

from __future__ import annotations

from typing import Any

SDPO_EVENTS = ("on_step_end", "on_evaluate", "on_train_end")
HF_EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class ArgsView:
    """What a ``TrainerCallback`` reads as ``args``: the sdpo config, by TRL/transformers names
    where they mean the same (``args.output_dir``, ``args.max_steps``, ``args.num_generations``,
    ``args.learning_rate``); a name sdpo lacks raises AttributeError saying so."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._config.get(name)
        except KeyError as exc:
            raise AttributeError(f"args.{name}: {exc.args[0]}") from None

    def to_dict(self) -> dict[str, Any]:
        return self._config.to_dict()


class CallbackHandler:
    """The trainer's callbacks; :meth:`fire` calls each one that handles an event."""

    def __init__(self, callbacks: list[Any] | None) -> None:
        from transformers import TrainerCallback, TrainerControl, TrainerState

        self.hf: list[Any] = []
        self.sdpo: list[Any] = []
        for cb in callbacks or []:
            if isinstance(cb, type) and issubclass(cb, TrainerCallback):
                cb = cb()  # transformers accepts the class too
            if isinstance(cb, TrainerCallback):
                self.hf.append(cb)
            elif any(callable(getattr(cb, e, None)) for e in SDPO_EVENTS):
                self.sdpo.append(cb)
            else:
                raise TypeError(
                    f"Callback {cb!r} is neither a transformers TrainerCallback nor an object with "
                    f"any of {', '.join(SDPO_EVENTS)} (trainer, metrics)."
                )
        self.state = TrainerState()
        self.control = TrainerControl()

    def __iter__(self):
        return iter([*self.sdpo, *self.hf])

    def __len__(self) -> int:
        return len(self.sdpo) + len(self.hf)

    def append(self, callback: Any) -> None:
        """Add a callback after the trainer was built (``trainer.callbacks.append(cb)``)."""
        other = CallbackHandler([callback])
        self.hf += other.hf
        self.sdpo += other.sdpo

    @property
    def should_stop(self) -> bool:
        """A ``TrainerCallback`` set ``control.should_training_stop``."""
        return bool(self.control.should_training_stop)

    def fire(self, event: str, trainer: Any, metrics: dict[str, Any] | None = None) -> None:
        """Call ``event`` on every callback that has it, each in its own convention."""
        for cb in self.sdpo:
            fn = getattr(cb, event, None)
            if callable(fn) and event in SDPO_EVENTS:
                fn(trainer) if event == "on_train_end" else fn(trainer, metrics)
        if not self.hf:
            return
        self._sync_state(trainer, event, metrics)
        kwargs: dict[str, Any] = {
            "model": trainer.policy.model,
            "processing_class": trainer.policy.tokenizer,
            "optimizer": trainer.optimizer,
            "lr_scheduler": trainer.scheduler,
        }
        if event == "on_log":
            kwargs["logs"] = dict(metrics or {})
        elif event == "on_evaluate":
            kwargs["metrics"] = dict(metrics or {})
        args = ArgsView(trainer.config)
        for cb in self.hf:
            result = getattr(cb, event)(args, self.state, self.control, **kwargs)
            if result is not None:  # transformers lets a callback return a new control
                self.control = result

    def _sync_state(self, trainer: Any, event: str, metrics: dict[str, Any] | None) -> None:
        state = self.state
        state.global_step = trainer.global_step
        state.max_steps = trainer.config.run.max_steps
        state.epoch = trainer.train_data.progress
        state.logging_steps = trainer.config.run.logging_steps
        state.eval_steps = trainer.config.run.eval_steps
        state.save_steps = trainer.config.run.save_steps
        state.is_world_process_zero = state.is_local_process_zero = trainer.runtime.is_main
        if event == "on_log":
            state.log_history.append({**(metrics or {}), "step": trainer.global_step})
