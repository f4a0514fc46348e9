"""``GiftConfig``: what to adapt in a model and how (JSON-serialisable)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Union

import torch

SHARING = ("type", "all", "layer")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMS = ("auto", "epilogue", "input")
# task type -> the heads a freshly built task model has (PEFT's modules_to_save for the same task types)
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}


def check_stacked(stacked, where: str, field_name: str = "stacked") -> None:
    if not isinstance(stacked, dict):
        raise ValueError(f"{where}: {field_name} must be a dict of name -> split sizes, got {stacked!r}")
    for name, spec in stacked.items():
        ok = (isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1) or (
            isinstance(spec, (list, tuple)) and spec and all(isinstance(s, int) and s >= 1 for s in spec)
        )
        if not ok:
            raise ValueError(f"{where}: {field_name}[{name!r}] must be a chunk count >= 1 or a list of sizes, got {spec!r}")


@dataclass
class GiftConfig:
    """What to adapt and how. JSON-serialisable (:meth:`to_json` / :meth:`from_json`).

    Attributes:
        rank: r, the width of Theta = (phi: d_in x r, psi: r x d_in); default 16.
        r: PEFT's name for ``rank``, accepted as an alias (``GiftConfig(r=8)``); giving both is
            allowed only when they agree. Stored as ``rank``.
        target_modules: a list of module-name suffixes (``"query"`` matches
            ``encoder.layer.0.attention.self.query``; a dotted suffix such as
            ``"attention.output.dense"`` is allowed), or one regular expression matched against
            the whole module name. As in PEFT.
        layers: keep only targets in these layer indices (None: all layers).
        layers_pattern: the name of the layer list (``"layer"``, ``"layers"``, ``"h"``) whose
            index ``layers`` refers to; None takes the first number in the module name.
        sharing: ``"type"`` (the paper's default): one Theta per target type, i.e. per entry of
            ``target_modules`` (per last name component for a regex), shared across layers;
            ``"all"``: one Theta for every adapted projection; ``"layer"``: one per layer.
        theta_dtype: ``"float32"``, ``"bfloat16"``, ... ; None uses the adapted weights' dtype.
        in_bias, out_bias: the biases of GIFT's two projections (the authors'
            ``in_projection_bias`` / ``out_projection_bias``); see
            :class:`~gift_kernels.nn.GiftThetaWithBias`.
        stacked: layers whose weight stacks several projections, by name suffix: the row split
            sizes (``{"qkv_proj": [4096, 1024, 1024]}``) or a number of equal chunks
            (``{"c_attn": 3}`` for GPT-2). Each chunk gets its own Theta.
        trainable_modules: modules (by name suffix) left trainable and saved with the adapter,
            e.g. ``["classifier"]`` (a single string is one name).
        task_type: ``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ... as in PEFT: the task
            head the model has (``classifier`` / ``score`` / ``qa_outputs``) is added to
            ``trainable_modules``. A model with such a head that stays frozen gets a warning.
        init_weights: True (the authors' init: psi = 0, outputs unchanged at the start) or
            False (psi drawn like phi: an adapter that changes outputs, for tests), as PEFT's
            ``init_weights``.
        form: ``"auto"``, ``"epilogue"`` or ``"input"``: which of GIFT's two equivalent forms
            dense layers compute (see :func:`gift_kernels.gift_linear`).
    """

    rank: Optional[int] = None  # None: r if given, else 16 (resolved in __post_init__)
    target_modules: Union[List[str], str] = field(default_factory=list)
    layers: Optional[List[int]] = None
    layers_pattern: Optional[str] = None
    sharing: str = "type"
    theta_dtype: Optional[str] = None
    in_bias: bool = False
    out_bias: bool = False
    stacked: Dict[str, Union[int, List[int]]] = field(default_factory=dict)
    trainable_modules: List[str] = field(default_factory=list)
    task_type: Optional[str] = None
    init_weights: bool = True
    form: str = "auto"
    r: Optional[int] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.r is not None:
            if self.rank is not None and self.rank != self.r:
                raise ValueError(f"GiftConfig: rank={self.rank!r} and its PEFT spelling r={self.r!r} disagree; give one")
            self.rank, self.r = self.r, None
        elif self.rank is None:
            self.rank = 16
        if isinstance(self.target_modules, (set, frozenset)):
            self.target_modules = sorted(self.target_modules)
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.trainable_modules, str):
            self.trainable_modules = [self.trainable_modules]
        elif isinstance(self.trainable_modules, (tuple, set, frozenset)):
            self.trainable_modules = list(self.trainable_modules)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"GiftConfig: rank must be an int >= 1, got {self.rank!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as exc:
                raise ValueError(f"GiftConfig: target_modules {tm!r} is not a valid regular expression: {exc}") from exc
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(f"GiftConfig: target_modules must be a non-empty list of names or a regex, got {tm!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"GiftConfig: sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.theta_dtype is not None and self.theta_dtype not in DTYPES:
            raise ValueError(f"GiftConfig: theta_dtype must be None or one of {sorted(DTYPES)}, got {self.theta_dtype!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = list(self.layers)
            if not self.layers or not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise ValueError(f"GiftConfig: layers must be a non-empty list of indices >= 0, got {self.layers!r}")
        check_stacked(self.stacked, "GiftConfig")
        if not isinstance(self.trainable_modules, list) or not all(isinstance(t, str) and t for t in self.trainable_modules):
            raise ValueError(f"GiftConfig: trainable_modules must be a list of names, got {self.trainable_modules!r}")
        if self.task_type is not None and self.task_type not in TASK_HEADS:
            raise ValueError(f"GiftConfig: task_type must be None or one of {sorted(TASK_HEADS)}, got {self.task_type!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"GiftConfig: init_weights must be True or False, got {self.init_weights!r}")
        if self.form not in FORMS:
            raise ValueError(f"GiftConfig: form must be one of {FORMS}, got {self.form!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("r")  # resolved into rank
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GiftConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GiftConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GiftConfig":
        return cls.from_dict(json.loads(text))

    def torch_theta_dtype(self) -> Optional[torch.dtype]:
        return None if self.theta_dtype is None else DTYPES[self.theta_dtype]
