"""The scenario file: a typed, validated description of one experiment.

``load_scenario(path)`` reads YAML, validates it against :class:`Scenario` and raises
:class:`~testbed.errors.ConfigError` listing *every* problem, each with its dotted key::

    scenarios/x.yaml: parties.link.up_mbps: must be > 0 (got -5)

Validate from the shell:  python -m testbed validate scenarios/x.yaml
"""
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from .errors import ConfigError
from .merge import deep_merge  # noqa: F401  (re-exported: overrides are merged here)
from .engine.links import LinkCfg
from .units import parse_size


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe")
# Keys that only a mixture-of-experts family reads: a dense family (llama) ignores them.
_MOE_ONLY = {"families": MOE_FAMILIES}


class ModelCfg(Strict):
    family: Literal["mixtral", "llama", "olmoe", "qwen2_moe"] = "mixtral"
    path: Optional[str] = None  # a local directory for from_pretrained
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_experts: int = Field(8, ge=1, json_schema_extra=_MOE_ONLY)
    top_k: int = Field(2, ge=1, json_schema_extra=_MOE_ONLY)
    max_position: int = Field(512, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    router_aux_loss_coef: float = Field(0.01, ge=0, json_schema_extra=_MOE_ONLY)

    @model_validator(mode="after")
    def _shapes(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        if self.family in MOE_FAMILIES and self.top_k > self.num_experts:
            problems.append(f"top_k {self.top_k} must be <= num_experts {self.num_experts}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def model_key_applies(family, key):
    """Whether ``model.<key>`` means anything for ``family``: False for the
    mixture-of-experts keys (num_experts, top_k, router_aux_loss_coef) of a dense family."""
    info = ModelCfg.model_fields.get(key)
    families = (info.json_schema_extra or {}).get("families") if info is not None else None
    return families is None or family in families


class SplitCfg(Strict):
    method: Literal["iid", "dirichlet", "quantity", "by_source"] = "iid"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration / quantity-skew power
    label: str = "kind"


class CanaryCfg(Strict):
    count: int = Field(8, ge=0)
    repeats: int = Field(1, ge=1)
    # traffic: each canary's window also opens its holder's first batches, so the captured,
    # attacked steps carry it (parties/data/canaries.py); records: only inside the records.
    placement: Literal["traffic", "records"] = "traffic"


class TokenizerCfg(Strict):
    vocab_size: int = Field(1024, ge=64)
    path: Optional[str] = None  # a local tokenizer.json to load instead of training
    cache_dir: Optional[str] = None


class DataCfg(Strict):
    source: Literal["generate", "text", "jsonl", "datasets"] = "generate"
    path: Optional[str] = None
    text_field: str = "text"
    kinds: list[str] = Field(default_factory=lambda: ["patient_note", "support_ticket", "email"])
    records: int = Field(400, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    split: SplitCfg = Field(default_factory=SplitCfg)
    canaries: CanaryCfg = Field(default_factory=CanaryCfg)
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)

    @model_validator(mode="after")
    def _path(self):
        if self.source != "generate" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


# A link is a profile name or inline numbers; tagged so errors name only the branch given.
LinkSpec = Annotated[
    Union[Annotated[str, Tag("profile")], Annotated[LinkCfg, Tag("inline")]],
    Discriminator(lambda v: "profile" if isinstance(v, str) else "inline")]
_TAGS = {"profile", "inline"}


class PartyOverride(Strict):
    device: Optional[str] = None
    link: Optional[LinkSpec] = None
    memory_budget: Optional[Union[int, str]] = None


class PartiesCfg(Strict):
    count: int = Field(4, ge=1)
    memory_budget: Optional[Union[int, str]] = None
    on_exceed: Literal["error", "warn"] = "error"
    device: str = "host"
    link: LinkSpec = "lan"
    overrides: dict[int, PartyOverride] = Field(default_factory=dict)
    cpus: Optional[float] = Field(None, gt=0)  # container mode: CPU limit per party container

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v):
        return None if v is None else parse_size(v)


class CoordinatorCfg(Strict):
    device: str = "host"
    link: LinkSpec = "lan"
    cpus: Optional[float] = Field(None, gt=0)  # container mode: CPU limit of the coordinator


class TrainingCfg(Strict):
    steps: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    seq_len: int = Field(64, ge=4)
    lr: float = Field(3e-3, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(20, gt=0)
    eval_batches: int = Field(4, gt=0)


class ComputeCfg(Strict):
    # flops: deterministic simulated time (FLOPs against the device profile); measured
    # wall time depends on the machine's load and flips orderings between runs
    mode: Literal["measured", "flops", "none"] = "flops"


class PretrainCfg(Strict):
    """Pre-train the shared starting checkpoint on public text (parties/pretrain.py)."""

    steps: int = Field(300, gt=0)
    records: int = Field(2000, gt=0)          # public records generated for pre-training
    kinds: Optional[list[str]] = None         # default: the kinds no party holds
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0                             # its own seed: one checkpoint for every run seed
    cache_dir: str = ".cache/init"            # checkpoints live in <cache_dir>/<config hash>/


class InitCfg(Strict):
    """Where the shared starting checkpoint comes from: ``model`` (random init or
    ``model.path``) unless ``pretrain`` is given."""

    pretrain: Optional[PretrainCfg] = None


class CaptureStepsCfg(Strict):
    """A sample of steps: every ``every``-th step (0, N, 2N, ...), the ``first`` K and the
    ``last`` K steps of the run, together."""

    every: Optional[int] = Field(None, gt=0)
    first: int = Field(0, ge=0)
    last: int = Field(0, ge=0)


class CaptureTensorsCfg(Strict):
    """Which captured messages keep their tensors (the index keeps every message).

    ``steps``: ``all``, a list of steps, or a :class:`CaptureStepsCfg` sample; ``kinds``:
    the message kinds that keep tensors at those steps (None: every kind);
    ``every_step``: kinds that keep tensors at every step (the state an attack replays,
    e.g. FedSGD's broadcast ``update``).  Setup messages (step < 0) always keep theirs."""

    steps: Union[Literal["all"], list[Annotated[int, Field(ge=0)]], CaptureStepsCfg] = "all"
    kinds: Optional[list[str]] = None
    every_step: list[str] = Field(default_factory=list)


class CaptureCfg(Strict):
    """``tensors``: ``true`` (every tensor), ``false`` (metadata only), ``auto`` (what the
    scenario's attacks read, plus a sample of steps for attacks run later; see
    :mod:`testbed.run.capture_policy`) or a :class:`CaptureTensorsCfg`."""

    enabled: bool = True
    tensors: Union[bool, Literal["auto"], CaptureTensorsCfg] = "auto"


class DefenceCfg(Strict):
    """A defence wrapped around a protocol (see parties/defences/)."""

    type: Literal["noise", "clip_noise", "quantize", "topk", "secagg", "santext", "dp_sgd"]
    sigma: float = Field(0.0, ge=0)                 # noise, clip_noise: Gaussian std (ratio for clip_noise)
    clip: float = Field(0.0, ge=0)                  # clip_noise: row L2 bound (0: each row's own norm)
    bits: Literal["bf16", "int8", "fp16"] = "bf16"  # quantize: wire precision
    fraction: float = Field(0.1, gt=0, le=1)        # topk: fraction of entries sent
    frac_bits: int = Field(24, ge=8, le=28)         # secagg: fixed-point fraction bits
    epsilon: float = Field(1.0, gt=0)               # santext: metric-DP epsilon per token
    kinds: list[str] = Field(default_factory=list)  # message kinds it applies to (empty = all)
    noise_multiplier: float = Field(1.0, ge=0)      # dp_sgd
    max_grad_norm: float = Field(1.0, gt=0)         # dp_sgd
    delta: float = Field(1e-5, gt=0, lt=1)          # dp_sgd


class ProtocolCfg(Strict):
    name: str = "centralized"
    options: dict = Field(default_factory=dict)


class Scenario(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    # several seeds: one child run directory per seed, mean ± 95% CI on top (testbed.run.seeds)
    seeds: Optional[list[int]] = None
    torch_device: Literal["cpu", "cuda"] = "cpu"
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    protocol: ProtocolCfg = Field(default_factory=ProtocolCfg)
    baselines: list[str] = Field(default_factory=list)
    parties: PartiesCfg = Field(default_factory=PartiesCfg)
    coordinator: CoordinatorCfg = Field(default_factory=CoordinatorCfg)
    training: TrainingCfg = Field(default_factory=TrainingCfg)
    compute: ComputeCfg = Field(default_factory=ComputeCfg)
    init: InitCfg = Field(default_factory=InitCfg)
    capture: CaptureCfg = Field(default_factory=CaptureCfg)
    defences: list[DefenceCfg] = Field(default_factory=list)
    attacks: list[Union[str, dict]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _init(self):
        if self.init.pretrain is not None:
            clash = [k for k, v in (("model.path", self.model.path),
                                    ("data.tokenizer.path", self.data.tokenizer.path)) if v]
            if clash:
                raise ValueError(f"init.pretrain builds the checkpoint and its tokenizer; "
                                 f"remove {' and '.join(clash)}")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"must be a non-empty list of distinct integers (got {v!r})")
        return v

    def resolved(self):
        """The scenario with every default filled in, as plain data."""
        return self.model_dump(mode="json")

    def digest(self):
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]


def _dotted(loc):
    return ".".join(str(p) for p in loc
                    if str(p) not in _TAGS and not str(p).startswith(("function-", "tagged-union")))


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err):
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        msg = f"must be {_BOUNDS[kind]} {bound}"
    elif kind == "literal_error":
        msg = f"must be one of {ctx.get('expected')}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    # validators that name the value themselves (e.g. parse_size) are not repeated
    return f"{msg} (got {err['input']!r})" if "input" in err and "(got " not in msg else msg


def _get(data, dotted, default=None):
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _semantic_problems(data):
    """Checks against the registries (protocol, link and device names) on the raw data, so
    they are reported together with the schema's problems."""
    from .engine import devices, links
    from parties.registry import protocol_names

    problems = []
    names = protocol_names()
    checks = [("protocol.name", _get(data, "protocol.name"))]
    baselines = _get(data, "baselines", [])
    checks += [(f"baselines.{i}", b) for i, b in enumerate(baselines if isinstance(baselines, list) else [])]
    for key, name in checks:
        if isinstance(name, str) and name not in names:
            problems.append(f"{key}: unknown protocol {name!r}; valid: {', '.join(names)}")
    specs = [("parties.link", _get(data, "parties.link")), ("coordinator.link", _get(data, "coordinator.link"))]
    devs = [("parties.device", _get(data, "parties.device")),
            ("coordinator.device", _get(data, "coordinator.device"))]
    overrides = _get(data, "parties.overrides", {})
    count = _get(data, "parties.count", 4)
    for i, o in (overrides.items() if isinstance(overrides, dict) else []):
        if isinstance(i, int) and isinstance(count, int) and i >= count:
            problems.append(f"parties.overrides.{i}: no such party (count is {count})")
        if isinstance(o, dict):
            specs.append((f"parties.overrides.{i}.link", o.get("link")))
            devs.append((f"parties.overrides.{i}.device", o.get("device")))
            if o.get("memory_budget") is not None:
                try:
                    parse_size(o["memory_budget"])
                except ValueError as e:
                    problems.append(f"parties.overrides.{i}.memory_budget: {e}")
    for key, spec in specs:
        if isinstance(spec, str) and spec not in links.PROFILES:
            problems.append(f"{key}: unknown link profile {spec!r}; valid: {', '.join(links.PROFILES)}")
    for key, name in devs:
        if isinstance(name, str) and name not in devices.PROFILES:
            problems.append(f"{key}: unknown device profile {name!r}; valid: {', '.join(devices.PROFILES)}")
    kinds = _get(data, "data.kinds")
    if _get(data, "data.split.method") == "by_source" and _get(data, "data.source", "generate") == "generate" \
            and isinstance(kinds, list) and isinstance(count, int) and len(kinds) < count:
        problems.append(f"data.split.method: by_source needs at least one kind per party "
                        f"({len(kinds)} kinds for {count} parties)")
    return problems


def parse_scenario(data, path="<scenario>"):
    """Validate a dict; raise ConfigError with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError(path, [f"top level: expected a mapping (got {type(data).__name__})"])
    problems, sc = [], None
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_dotted(e['loc']) or 'top level'}: {_describe(e)}" for e in exc.errors()]
    problems += _semantic_problems(data)
    if problems:
        raise ConfigError(path, problems)
    return sc


def read_yaml(path):
    """A YAML file's data; ConfigError naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {' '.join(str(exc).split())}"]) from None


def load_scenario(path, overrides=None):
    """Read and validate a scenario YAML file. ``overrides`` is a dict merged on top."""
    path = Path(path)
    data = read_yaml(path)
    if overrides:
        # lists the file leaves out are empty, so that an item number names a missing item
        lists = {k: [] for k, f in Scenario.model_fields.items() if f.default_factory is list}
        try:
            data = deep_merge({**lists, **(data or {})}, overrides)
        except IndexError as exc:
            raise ConfigError(path, [str(exc)]) from None
    return parse_scenario(data, path)
