"""SDPOConfig: the whole configuration, its keys (dotted, flat, TRL's), overrides, validation and
YAML round trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdpo.config.parsing import (
    TEMPLATE_FIELDS,
    _all_keys,
    _check_template,
    _convert,
    _flatten,
    _read_yaml,
    _suggestions,
)
from sdpo.config.presets import (
    PRESETS,
)
from sdpo.config.sections import (
    _SUBSECTIONS,
    MAX_SAMPLES_PER_PROMPT,
    SECTIONS,
    DataConfig,
    DistributedConfig,
    GenerationConfig,
    HealthConfig,
    ModelConfig,
    OptimizationConfig,
    PolicyGradientConfig,
    RunConfig,
    SelfDistillationConfig,
    _f,
    _type_hints,
)
from sdpo.config.trl_keys import (
    TRL_ALIASES,
    TRL_KEY_HINTS,
    TRL_VALUES,
    trl_key,
)
from sdpo.run_dir import write_text_atomic


@dataclass
class SDPOConfig:
    """The whole configuration of an sdpo run (see the section classes for each field's doc)."""

    model_name: str = _f(
        "demo", "Model path or hub id; 'demo' = the small model shipped with sdpo."
    )
    num_samples_per_prompt: int = _f(
        4, "Rollouts per prompt G (one group).", min=1, max=MAX_SAMPLES_PER_PROMPT
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    self_distillation: SelfDistillationConfig = field(default_factory=SelfDistillationConfig)
    policy_gradient: PolicyGradientConfig = field(default_factory=PolicyGradientConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __init__(self, **kwargs: Any) -> None:
        for fld in dataclasses.fields(self):
            has_factory = fld.default_factory is not dataclasses.MISSING
            setattr(self, fld.name, fld.default_factory() if has_factory else fld.default)
        given: dict[str, str] = {}  # dotted key -> how it was given, to catch a key set twice

        def assign(name: str, value: Any) -> None:
            if isinstance(value, dict) and name in _SUBSECTIONS:  # model.lora: {r: 8}
                for sub, v in value.items():
                    assign(f"{name}.{sub}", v)
                return
            mapped = trl_key(name, value) if "." not in name else None
            if mapped is not None and name not in self.keys():
                name, value = mapped  # a TRL name (and value) for an sdpo key
            key = self.resolve_key(name)
            if key in given:
                raise ValueError(
                    f"{key} is set twice (as {given[key]!r} and as {name!r}); keep one of them."
                )
            given[key] = name
            self.set(key, value)

        for key, value in kwargs.items():
            if key in SECTIONS and isinstance(value, dict):
                for sub, v in value.items():
                    assign(f"{key}.{sub}", v)
            elif key in SECTIONS and isinstance(value, SECTIONS[key]):
                setattr(self, key, value)
            else:
                assign(key.replace("__", "."), value)
        self.validate()

    # ----- lookup -------------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """Every valid dotted key, e.g. ``self_distillation.alpha``."""
        return list(_all_keys(cls))

    @classmethod
    def resolve_key(cls, key: str) -> str:
        """Map a dotted key, or a leaf name unique across sections, to its dotted key."""
        valid = cls.keys()
        if key in valid:
            return key
        if "." not in key:
            owners = [k for k in valid if k.split(".")[-1] == key]
            if len(owners) == 1:
                return owners[0]
            if key in TRL_ALIASES:  # TRL's name for the same setting
                return TRL_ALIASES[key]
            if key in TRL_VALUES:
                return TRL_VALUES[key][0]
        if key.split(".")[-1] in TRL_KEY_HINTS:
            raise KeyError(f"Unknown config key {key!r}: {TRL_KEY_HINTS[key.split('.')[-1]]}")
        hint = _suggestions(key, valid)
        raise KeyError(f"Unknown config key {key!r}.{hint} (`sdpo train --help` lists all keys.)")

    @staticmethod
    def field_info(key: str) -> tuple[dataclasses.Field, Any]:
        """The dataclass field and its resolved type for a dotted key."""
        owner: type = SDPOConfig
        *path, name = key.split(".")
        for part in path:  # a section, then nested sub-sections (model.lora)
            owner = SECTIONS[part] if owner is SDPOConfig else _type_hints(owner)[part]
        fld = next(f for f in dataclasses.fields(owner) if f.name == name)
        return fld, _type_hints(owner)[name]

    def get(self, key: str) -> Any:
        """Value of a (dotted or unique leaf) key."""
        key = self.resolve_key(key)
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def set(self, key: str, value: Any) -> None:
        """Set a (dotted or unique leaf) key, converting strings to the field's type.

        A sub-section (``model.lora``) takes a mapping of its own keys."""
        if isinstance(value, dict) and key.replace("__", ".") in _SUBSECTIONS:
            for sub, v in value.items():
                self.set(f"{key.replace('__', '.')}.{sub}", v)
            return
        mapped = trl_key(key, value) if "." not in key else None
        if mapped is not None and key not in self.keys():
            key, value = mapped  # a TRL name (and value) for an sdpo key
        key = self.resolve_key(key)
        fld, typ = self.field_info(key)
        value = _convert(key, value, typ)
        obj: Any = self
        *path, name = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)

    def apply_overrides(
        self, overrides: list[str], data_files: tuple[str, ...] = ("data.train_file",)
    ) -> SDPOConfig:
        """Apply ``key=value`` strings (``self_distillation.alpha=1.0``) in order, then validate.

        The overrides are a layer over this config: naming one of ``data_files`` replaces a
        built-in ``data.task`` set before (a preset's), see :meth:`replace_data_source`."""
        given: set[str] = set()
        for item in overrides:
            if "=" not in item:
                raise ValueError(
                    f"Override {item!r} must look like key=value, e.g. self_distillation.alpha=1.0"
                )
            key, raw = item.split("=", 1)
            self.set(key.strip(), raw.strip())
            given.add(self.resolve_key(key.strip()))
        self.replace_data_source(given, data_files)
        self.validate()
        return self

    def replace_data_source(
        self, given: set[str], data_files: tuple[str, ...] = ("data.train_file",)
    ) -> None:
        """The data source set last wins: a layer (the keys ``given`` over a preset, a config
        file or a run's config) that sets a data file but no ``data.task`` drops the task set
        before, so ``sdpo train data.train_file=x.jsonl`` trains on the file as a TRL user
        expects, not on the quickstart's arithmetic; a layer that sets ``data.task`` but no file
        drops earlier files. Both in one layer is refused by :meth:`validate`."""
        files = [k for k in data_files if k in given and self.get(k) is not None]
        if files and "data.task" not in given:
            self.data.task = None
        elif "data.task" in given and self.data.task is not None and not files:
            self.data.train_file = self.data.eval_file = None

    # ----- validation ---------------------------------------------------------------------------

    def validate(self) -> SDPOConfig:
        """Check every field's type and range; raise ValueError naming the field and the allowed range."""
        for key in self.keys():
            fld, typ = self.field_info(key)
            value = self.get(key)
            _convert(key, value, typ)  # type check
            meta = fld.metadata
            if value is None:
                continue
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{key} = {value!r} is not one of {list(meta['choices'])}.")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(
                        f"{key} is {'NaN' if math.isnan(value) else value}; give a finite number."
                    )
                lo, hi = meta.get("min"), meta.get("max")
                lo_ex, hi_ex = meta.get("min_exclusive"), meta.get("max_exclusive")
                if lo is not None and value < lo:
                    raise ValueError(
                        f"{key} = {value} is out of range: must be >= {lo}{f' and <= {hi}' if hi is not None else ''}."
                    )
                if hi is not None and value > hi:
                    raise ValueError(
                        f"{key} = {value} is out of range: must be <= {hi}{f' and >= {lo}' if lo is not None else ''}."
                    )
                if lo_ex is not None and value <= lo_ex:
                    raise ValueError(f"{key} = {value} is out of range: must be > {lo_ex}.")
                if hi_ex is not None and value >= hi_ex:
                    raise ValueError(f"{key} = {value} is out of range: must be < {hi_ex}.")
        for key in ("model_name", "run.output_dir"):
            if not self.get(key).strip():
                raise ValueError(
                    f"{key} is empty; give a {'model path or hub id' if key == 'model_name' else 'directory'}."
                )
        gen = self.generation
        if gen.min_new_tokens > gen.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens = {gen.min_new_tokens} is more than "
                f"generation.max_new_tokens = {gen.max_new_tokens}."
            )
        if self.generation.backend == "vllm" and self.model.lora.r > 0:
            raise ValueError(
                "generation.backend = 'vllm' with model.lora.r > 0 is not supported yet (the weight "
                "push sends full weights, not adapters); use generation.backend = 'hf' with LoRA."
            )
        from sdpo.tracking import TRACKERS

        for name in self.run.report_to:
            if name not in TRACKERS:
                raise ValueError(
                    f"run.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}."
                )
        if self.data.task is not None and self.data.train_file is not None:
            raise ValueError(
                f"data.task = {self.data.task!r} and data.train_file = {self.data.train_file!r} are "
                "both set, and a built-in task brings its own data: set data.task=none to train on "
                "the file, or drop data.train_file."
            )
        sd = self.self_distillation
        for name, (fields, required) in TEMPLATE_FIELDS.items():
            _check_template(f"self_distillation.{name}", getattr(sd, name), fields, required)
        if not math.isfinite(sd.success_reward_threshold):
            raise ValueError("self_distillation.success_reward_threshold must be a finite number.")
        if sd.distillation_level == "token" and sd.alpha != 1.0:
            raise ValueError(
                "self_distillation.distillation_level = 'token' needs self_distillation.alpha = 1.0 (reverse KL on the sampled token)."
            )
        if sd.divergence_clip is not None and sd.distillation_level != "logit":
            raise ValueError(
                "self_distillation.divergence_clip clips a divergence, which the sampled-token "
                "estimator (distillation_level = 'token') does not compute; use "
                "distillation_level=logit or divergence_clip=null."
            )
        if sd.contrastive_weight > 0 and self.distributed.strategy == "fsdp":
            raise ValueError(
                "self_distillation.contrastive_weight > 0 is not supported with "
                "distributed.strategy=fsdp yet (its second teacher pass is not run in lockstep); "
                "use ddp or contrastive_weight=0."
            )
        if sd.routing != "none" and sd.distillation_weight == 0:
            raise ValueError(
                "self_distillation.routing splits rows between distillation and a PG term weighted "
                "like the distillation term; with distillation_weight = 0 both are off. Set "
                "self_distillation.distillation_weight > 0 or routing=none."
            )
        return self

    # ----- serialization ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict of the config."""
        out: dict[str, Any] = {
            "model_name": self.model_name,
            "num_samples_per_prompt": self.num_samples_per_prompt,
        }
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDPOConfig:
        """Build from a nested (or flat dotted) dict; unknown keys raise with the closest valid key."""
        if not isinstance(data, dict):
            raise ValueError(
                f"A config must be a mapping of keys to values, got {type(data).__name__}."
            )
        return cls(**{k.replace(".", "__"): v for k, v in data.items()})

    def to_yaml(self, path: str | Path, comment: str | None = None) -> None:
        """Write the config as YAML, atomically (the old file stays whole if the write fails);
        ``comment`` lines go first as ``# ...`` (what the run resolved, e.g. model.dtype=auto)."""
        head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
        write_text_atomic(path, head + yaml.safe_dump(self.to_dict(), sort_keys=False))

    def diff(self, other: SDPOConfig) -> dict[str, tuple[Any, Any]]:
        """``{dotted key: (self's value, other's value)}`` for every key where the two differ."""
        return {k: (self.get(k), other.get(k)) for k in self.keys() if self.get(k) != other.get(k)}

    @classmethod
    def resumable_keys(cls) -> list[str]:
        """Keys a resumed run may change (bookkeeping, learning rate, clip); the others are fixed."""
        return [k for k in cls.keys() if cls.field_info(k)[0].metadata.get("resumable")]

    @classmethod
    def from_yaml(cls, path: str | Path) -> SDPOConfig:
        """Read a YAML config written by :meth:`to_yaml` (or by hand; sections may be partial).

        Errors name the file (and line); a key given twice is refused.
        """
        path = Path(path)
        data = _read_yaml(path) or {}
        if isinstance(data, dict) and "preset" in data:
            name = data.pop("preset")
            base = cls.preset(name)
            given: dict[str, str] = {}
            for key, value in _flatten(data):
                if isinstance(value, dict) and key in _SUBSECTIONS:
                    base.set(key, value)
                    continue
                resolved = cls.resolve_key(key)
                if resolved in given:
                    raise ValueError(
                        f"{path}: {resolved} is set twice (as {given[resolved]!r} and as {key!r})."
                    )
                given[resolved] = key
                base.set(key, value)
            base.replace_data_source(set(given))
            return base.validate()
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SDPOConfig:
        """A named preset (``seed``, ``paper``, ``grpo``) with optional keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        config = cls()
        for key, value in PRESETS[name].items():
            config.set(key, value)
        for key, value in overrides.items():
            config.set(key.replace("__", "."), value)
        config.replace_data_source({cls.resolve_key(k.replace("__", ".")) for k in overrides})
        return config.validate()

    def __repr__(self) -> str:
        return f"SDPOConfig({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SDPOConfig) and self.to_dict() == other.to_dict()
