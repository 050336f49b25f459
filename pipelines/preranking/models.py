"""AutoFAS models over the columns of a prepared click table (`FeatureSpec`).

Every model maps `(cat, num)` to click logits of shape (B,):

- `cat`: int64 (B, n_categorical) ids in `spec.categorical` order (0 = out of vocabulary);
- `num`: float32 (B, n_numeric, 2): per numeric feature (standardised value, missing indicator).

Models: `DCNv2` (the ranking teacher: explicit crosses + a deep MLP), `LogisticRegression`, `TwoTower`
(dot product of a user tower and an item tower), `Student` (an MLP over a subset of features: the hand-made
MLP 64-32, and every architecture the search derives), `ColdLike` (COLD: SE-block feature weighting + MLP) and
`Supernet` (one gate per feature and L mixed layers; see `pipelines.preranking.search`).

Every model is described by a JSON-able `arch` dict and rebuilt by `build_model(arch, spec)`; weights are
saved as safetensors next to `arch.json` and the feature spec (`save_model` / `load_model`): no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.data.clicks import FeatureSpec

__all__ = [
    "ColdLike", "DCNv2", "FeatureEmbedding", "LogisticRegression", "Student", "Supernet", "TwoTower",
    "build_model", "feature_sides", "load_model", "save_model",
]

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "feature_spec.json"

# Which side of the request a MovieLens feature belongs to (for the two-tower baseline). hour/weekday describe
# the request, so they go with the user. Synthetic data writes its own sides to feature_meta.json.
MOVIELENS_SIDES = {"user_id": "user", "age": "user", "gender": "user", "occupation": "user", "zip3": "user",
                   "hour": "user", "weekday": "user", "item_id": "item", "release_year": "item", "genre": "item"}


def feature_sides(spec: FeatureSpec, meta: dict[str, dict] | None = None) -> dict[str, str]:
    """user/item side per feature: from `feature_meta.json` when the data has one, the MovieLens table, else
    (Criteo, Avazu: anonymised, no side is known) the first half of the features as "user", the rest "item"."""
    names = [f.name for f in spec.features]
    if meta and all(n in meta and "side" in meta[n] for n in names):
        return {n: meta[n]["side"] for n in names}
    if all(n in MOVIELENS_SIDES for n in names):
        return {n: MOVIELENS_SIDES[n] for n in names}
    half = (len(names) + 1) // 2
    return {n: "user" if i < half else "item" for i, n in enumerate(names)}


class FeatureEmbedding(nn.Module):
    """One `dim`-vector per selected feature: an embedding table for a categorical feature, a linear map of
    (value, missing) for a numeric one. Output (B, F, dim) in the order of `features`."""

    def __init__(self, spec: FeatureSpec, dim: int, features: list[str] | None = None) -> None:
        super().__init__()
        by_name = {f.name: f for f in spec.features}
        self.features = list(features) if features is not None else [f.name for f in spec.features]
        unknown = [n for n in self.features if n not in by_name]
        if unknown:
            raise KeyError(f"features {unknown} are not in the feature spec ({sorted(by_name)})")
        cat_index = {n: i for i, n in enumerate(spec.categorical)}
        num_index = {n: i for i, n in enumerate(spec.numeric)}
        self.dim = dim
        self.tables = nn.ModuleList()
        # (is_categorical, column) per selected feature, kept as plain lists: forward indexes with ints.
        self.columns: list[tuple[bool, int]] = []
        for name in self.features:
            f = by_name[name]
            if f.kind == "categorical":
                self.tables.append(nn.Embedding(f.cardinality, dim))
                self.columns.append((True, cat_index[name]))
            else:
                self.tables.append(nn.Linear(2, dim))
                self.columns.append((False, num_index[name]))
        # std 1/sqrt(dim): with a small init (0.05 tried) MLPs sat for several epochs on the saddle of
        # interaction-only features (zero marginal effect, an XOR-like target) of the synthetic data.
        for t in self.tables:
            if isinstance(t, nn.Embedding):
                nn.init.normal_(t.weight, std=dim ** -0.5)

    def one(self, i: int, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        is_cat, col = self.columns[i]
        return self.tables[i](cat[:, col] if is_cat else num[:, col])

    def parts(self, cat: torch.Tensor, num: torch.Tensor) -> list[torch.Tensor]:
        return [self.one(i, cat, num) for i in range(len(self.features))]

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.parts(cat, num), dim=1)


def _mlp(in_dim: int, widths: list[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_dim, w), nn.ReLU()]
        in_dim = w
    return nn.Sequential(*layers), in_dim


class LogisticRegression(nn.Module):
    """A weight per categorical value and per numeric (value, missing), plus a bias."""

    def __init__(self, spec: FeatureSpec, features: list[str] | None = None) -> None:
        super().__init__()
        self.embed = FeatureEmbedding(spec, 1, features)
        for t in self.embed.tables:  # a linear model starts at zero, not at FeatureEmbedding's N(0, 1/dim)
            nn.init.zeros_(t.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.embed(cat, num).sum(dim=(1, 2)) + self.bias


class Student(nn.Module):
    """The pre-ranking MLP: concatenated embeddings of `features` -> ReLU layers of `widths` -> a logit.
    The hand-made MLP 64-32 is Student(all features, [64, 32]); a searched architecture is its features and
    the widths of its non-skip layers. Its forward is the code whose parts `latency.py` times."""

    def __init__(self, spec: FeatureSpec, features: list[str], widths: list[int], dim: int) -> None:
        super().__init__()
        if not features:
            raise ValueError("a student needs at least one feature")
        self.embed = FeatureEmbedding(spec, dim, features)
        self.layers = nn.ModuleList()
        in_dim = dim * len(features)
        for w in widths:
            self.layers.append(nn.Linear(in_dim, w))
            in_dim = w
        self.out = nn.Linear(in_dim, 1)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x = torch.cat(self.embed.parts(cat, num), dim=1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x).squeeze(1)


class TwoTower(nn.Module):
    """User tower (user-side features) . item tower (item-side features) + a bias. The item tower could be
    cached offline in production; here its latency is measured as part of the forward, like every model's."""

    def __init__(self, spec: FeatureSpec, sides: dict[str, str], dim: int, widths: list[int]) -> None:
        super().__init__()
        names = [f.name for f in spec.features]
        user = [n for n in names if sides.get(n) == "user"]
        item = [n for n in names if sides.get(n) != "user"]
        if not user or not item:
            raise ValueError(f"two-tower needs user and item features; sides: {sides}")
        self.user_embed, self.item_embed = FeatureEmbedding(spec, dim, user), FeatureEmbedding(spec, dim, item)
        self.user_mlp, out_u = _mlp(dim * len(user), widths)
        self.item_mlp, out_i = _mlp(dim * len(item), widths)
        self.user_out, self.item_out = nn.Linear(out_u, widths[-1]), nn.Linear(out_i, widths[-1])
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        u = self.user_out(self.user_mlp(self.user_embed(cat, num).flatten(1)))
        v = self.item_out(self.item_mlp(self.item_embed(cat, num).flatten(1)))
        return (u * v).sum(1) + self.bias


class ColdLike(nn.Module):
    """COLD (Wang et al. 2020): an SE block weights each feature's embedding (squeeze: mean of the vector;
    excite: FC-ReLU-FC-sigmoid over features), then a plain MLP. COLD's MLP is 1024-512-256-128-64; the
    widths are a config field so CPU profiles can scale it down."""

    def __init__(self, spec: FeatureSpec, dim: int, widths: list[int], reduction: int = 2) -> None:
        super().__init__()
        self.embed = FeatureEmbedding(spec, dim)
        n = len(spec.features)
        self.se = nn.Sequential(nn.Linear(n, max(1, n // reduction)), nn.ReLU(),
                                nn.Linear(max(1, n // reduction), n), nn.Sigmoid())
        self.mlp, out = _mlp(dim * n, widths)
        self.out = nn.Linear(out, 1)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        e = self.embed(cat, num)
        w = self.se(e.mean(dim=2))
        return self.out(self.mlp((e * w.unsqueeze(2)).flatten(1))).squeeze(1)


class DCNv2(nn.Module):
    """DCN-v2 (Wang et al. 2021), parallel form: cross layers x_{l+1} = x0 * (W x_l + b) + x_l beside a deep
    MLP over the same concatenated embeddings; the logit reads both."""

    def __init__(self, spec: FeatureSpec, dim: int, cross_layers: int, widths: list[int]) -> None:
        super().__init__()
        self.embed = FeatureEmbedding(spec, dim)
        d0 = dim * len(spec.features)
        self.cross = nn.ModuleList(nn.Linear(d0, d0) for _ in range(cross_layers))
        self.deep, out = _mlp(d0, widths)
        self.out = nn.Linear(d0 + out, 1)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(cat, num).flatten(1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)


class Supernet(nn.Module):
    """The AutoFAS search space as one network.

    Feature mask: a logit alpha_f per feature; keep-probability p_f = sigmoid(alpha_f). In training each
    row's gate is a binary-concrete (Gumbel-sigmoid) sample at temperature tau that scales the feature's
    embedding. Mixed layers: layer l holds one Linear(in, max(widths)); candidate op "width w" keeps its
    first w units (weight sharing by channel masking, as FBNetV2), and from layer 2 on a "skip" op passes
    the input through. A row's op mixture is a Gumbel-softmax sample over the layer's op logits, so the layer
    outputs h * (sum_k g_k mask_k) + g_skip * x. Layer 1 has no skip: its input is the feature concatenation,
    whose width is not a layer width. In `hard` mode (evaluation of the derived architecture under shared
    weights) gates are p_f > threshold and each layer takes its argmax op. `open_gates` keeps every feature
    (the search's warm-up) while ops are still sampled.
    """

    def __init__(self, spec: FeatureSpec, dim: int, widths: list[int], n_layers: int, gate_init: float = 1.0):
        super().__init__()
        if n_layers < 1 or not widths:
            raise ValueError("the supernet needs n_layers >= 1 and at least one width")
        self.widths = sorted(set(widths))
        self.n_layers = n_layers
        self.embed = FeatureEmbedding(spec, dim)
        self.features = self.embed.features
        self.wmax = self.widths[-1]
        n_feat = len(self.features)
        self.layers = nn.ModuleList(
            [nn.Linear(dim * n_feat, self.wmax)] + [nn.Linear(self.wmax, self.wmax) for _ in range(n_layers - 1)])
        self.out = nn.Linear(self.wmax, 1)
        masks = torch.zeros(len(self.widths), self.wmax)
        for k, w in enumerate(self.widths):
            masks[k, :w] = 1.0
        self.register_buffer("masks", masks)
        self.gate_logits = nn.Parameter(torch.full((n_feat,), float(gate_init)))
        # Layer 1: one logit per width; later layers: widths + skip (last).
        self.op_logits = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(self.widths) + (1 if i else 0))) for i in range(n_layers)])

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.gate_logits, *self.op_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def keep_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)

    def op_probs(self) -> list[torch.Tensor]:
        return [torch.softmax(a, dim=0) for a in self.op_logits]

    def forward(self, cat: torch.Tensor, num: torch.Tensor, tau: float = 1.0, hard: bool = False,
                threshold: float = 0.5, open_gates: bool = False) -> torch.Tensor:
        e = self.embed(cat, num)  # (B, F, d)
        b = e.shape[0]
        if open_gates:
            gates = torch.ones(b, len(self.features))
        elif hard:
            gates = (self.keep_probs() > threshold).float().expand(b, -1)
        else:
            u = torch.rand(b, len(self.features)).clamp_(1e-6, 1 - 1e-6)
            gates = torch.sigmoid((self.gate_logits + torch.log(u) - torch.log1p(-u)) / tau)
        x = (e * gates.unsqueeze(2)).flatten(1)
        k = len(self.widths)
        for i, layer in enumerate(self.layers):
            logits = self.op_logits[i]
            if hard:
                g = torch.nn.functional.one_hot(logits.argmax(), len(logits)).float().expand(b, -1)
            else:
                gumbel = -torch.log(-torch.log(torch.rand(b, len(logits)).clamp_(1e-6, 1 - 1e-6)))
                g = torch.softmax((logits + gumbel) / tau, dim=1)
            h = torch.relu(layer(x)) * (g[:, :k] @ self.masks)
            x = h + g[:, k:k + 1] * x if i else h
        return self.out(x).squeeze(1)

    def derive(self, threshold: float = 0.5) -> dict[str, Any]:
        """The discrete architecture: the features whose keep-probability exceeds `threshold` (at least the
        most probable one), and the strongest op of each layer ("skip" layers are dropped)."""
        p = self.keep_probs().detach()
        keep = [n for n, q in zip(self.features, p.tolist(), strict=True) if q > threshold]
        if not keep:
            keep = [self.features[int(p.argmax())]]
        ops = []
        for i, a in enumerate(self.op_logits):
            j = int(a.detach().argmax())
            ops.append("skip" if i and j == len(self.widths) else self.widths[j])
        return {"type": "student", "features": keep, "widths": [w for w in ops if w != "skip"], "ops": ops,
                "embedding_dim": self.embed.dim,
                "keep_probs": {n: round(float(q), 4) for n, q in zip(self.features, p.tolist(), strict=True)}}


def build_model(arch: dict[str, Any], spec: FeatureSpec) -> nn.Module:
    """Rebuild a model from its `arch` dict (the content of arch.json)."""
    kind = arch["type"]
    dim = int(arch.get("embedding_dim", 8))
    if kind == "student":
        return Student(spec, list(arch["features"]), [int(w) for w in arch["widths"]], dim)
    if kind == "logistic":
        return LogisticRegression(spec, arch.get("features"))
    if kind == "two_tower":
        return TwoTower(spec, arch["sides"], dim, [int(w) for w in arch["widths"]])
    if kind == "cold":
        return ColdLike(spec, dim, [int(w) for w in arch["widths"]], int(arch.get("reduction", 2)))
    if kind == "dcn_v2":
        return DCNv2(spec, dim, int(arch["cross_layers"]), [int(w) for w in arch["widths"]])
    if kind == "supernet":
        return Supernet(spec, dim, [int(w) for w in arch["widths"]], int(arch["n_layers"]),
                        float(arch.get("gate_init", 1.0)))
    raise ValueError(f"unknown model type {kind!r} in arch {arch}")


def model_features(arch: dict[str, Any], spec: FeatureSpec) -> list[str]:
    """The features a model reads (and so must fetch at serving time)."""
    return list(arch.get("features") or [f.name for f in spec.features])


def save_model(model: nn.Module, arch: dict[str, Any], spec: FeatureSpec, out_dir: Path) -> Path:
    """Write model.safetensors + arch.json + feature_spec.json into `out_dir`."""
    from safetensors.torch import save_file  # heavy: loaded only when used

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    (out_dir / ARCH_FILE).write_text(json.dumps(arch, indent=1, sort_keys=True) + "\n")
    spec.to_json(out_dir / SPEC_FILE)
    return out_dir


def load_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any], FeatureSpec]:
    """Inverse of `save_model`; the model comes back in eval mode."""
    from safetensors.torch import load_file  # heavy: loaded only when used

    model_dir = Path(model_dir)
    for name in (ARCH_FILE, WEIGHTS_FILE, SPEC_FILE):
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir / name} is missing: not a saved AutoFAS model folder")
    arch = json.loads((model_dir / ARCH_FILE).read_text())
    spec = FeatureSpec.from_json(model_dir / SPEC_FILE)
    model = build_model(arch, spec)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    return model.eval(), arch, spec
