"""The zoo's member table: every trained MoE of the project, its corpus, tokenizer, config and schedule.

One entry per member; `evals.zoo.data` builds its splits and tokens and `evals.zoo.train` trains,
evaluates and writes it, whatever its family. The two reference models are the **tuning** models
(settings may be chosen on them); every other member is a **validation** model, used only to
report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EVALS = Path(__file__).resolve().parents[1]
ROOT = EVALS.parent
ZOO = EVALS / "zoo"
CACHE = ZOO / "cache"
"""Downloads, full corpora, tokenizers, token tensors and training runs (gitignored)."""


@dataclass(frozen=True)
class Corpus:
    """A document collection split by document into train / validation / test.

    Attributes:
        name: Key of the corpus.
        sources: Source names (`evals.zoo.sources.FETCHERS`), fetched in this order.
        val_frac: Share of documents in the validation split (sha256 bucket of the document id).
        test_frac: Share in the test split.
        min_chars: Documents of at most this many characters are dropped.
        description: One line for the model card.
    """

    name: str
    sources: tuple[str, ...]
    val_frac: float
    test_frac: float
    min_chars: int
    description: str


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "reference",
            ("sotu", "brown", "kjv", "shakespeare"),
            0.05,
            0.08,
            200,
            "State of the Union addresses 1790-2021, the Brown corpus, the King James Bible, "
            "Shakespeare and Milton (public-domain English prose)",
        ),
        Corpus(
            "pydocs",
            ("pydocs",),
            0.1,
            0.1,
            200,
            "the Python 3.11 documentation's reST guides (tutorial, HOWTOs, language reference, FAQ, "
            "using and extending Python; Debian python3.11-doc)",
        ),
        Corpus(
            "wiki",
            ("wiki",),
            0.12,
            0.1,
            200,
            "106 English Wikipedia articles (the excerpt shipped as gensim 4.4.0's test data), markup stripped",
        ),
        Corpus(
            "fortunes",
            ("fortunes",),
            0.12,
            0.12,
            1,
            "Debian's fortune cookies (quotations, jokes, verse; packages fortunes and fortunes-min; the 35 "
            "files under 120 kB)",
        ),
    )
}


@dataclass(frozen=True)
class Member:
    """One zoo member.

    Attributes:
        name: Member name (also its folder, ``evals/zoo/<name>``, unless ``home`` is set).
        family: transformers ``model_type`` (``qwen3_moe``, ``glm4_moe``, ``mixtral``, ...).
        role: ``tuning`` (settings may be chosen on it) or ``validation`` (report only).
        corpus: Key of `CORPORA`.
        tokenizer: ``bpe:<vocab>`` (byte-level BPE trained on the train split), ``member:<name>``
            (another member's tokenizer) or ``path:<dir relative to the repo>`` (a vendored one).
        config: The family config's fields (vocab size and special ids are filled in).
        balance: ``aux`` (the family's load-balancing loss, ``router_aux_loss_coef``) or ``bias``
            (DeepSeek-V3: aux-loss-free correction-bias update + sequence-wise loss).
        router_shape: One line on the routing, for the zoo table.
        steps: Planned optimiser steps (length of the cosine schedule).
        home: The member's folder relative to the repo (``model/``, ``data/``) if not ``evals/zoo/<name>``.
        data: The folder of its committed splits relative to the repo, if not ``<home>/data``
            (members trained on another member's splits share them).
        train_file: Name of the committed train file in ``data/`` (the whole train split, or a sample).
        doc_sep: The token joining documents (default: the tokenizer's EOS).
        vocab_size: Embedding rows if not the tokenizer's length (the real Qwen3 model pads to 151,936).
        fp32_router: Keep routers and correction biases in float32 in the saved weights.
        experts_implementation: The transformers experts backend used for training (a speed choice:
            on CPU ``grouped_mm``'s loop is 1.4-2x faster than ``eager`` at 8-64 experts; the
            reference models were trained with ``eager``).
    """

    name: str
    family: str
    role: Literal["tuning", "validation"]
    corpus: str
    tokenizer: str
    config: dict[str, Any]
    balance: Literal["aux", "bias"]
    router_shape: str
    steps: int
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 80
    seed: int = 0
    aux_coef: float = 0.01
    bias_update_speed: float = 1e-3
    seq_aux_coef: float = 1e-4
    eval_every: int = 100
    eval_blocks: int = 96
    home: str | None = None
    data: str | None = None
    train_file: str = "train.jsonl"
    doc_sep: str | None = None
    vocab_size: int | None = None
    fp32_router: bool = False
    experts_implementation: str = "grouped_mm"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        """The member's folder."""
        return ROOT / self.home if self.home else ZOO / self.name

    @property
    def model_dir(self) -> Path:
        """Where the trained model (weights, tokenizer, card) is committed."""
        return self.dir / "model"

    @property
    def data_dir(self) -> Path:
        """Where the committed splits live."""
        return ROOT / self.data if self.data else self.dir / "data"

    @property
    def train_path(self) -> Path:
        """The committed train file (the whole train split, or a sample of it)."""
        return self.data_dir / self.train_file

    @property
    def train_committed_whole(self) -> bool:
        """Whether the committed train file is the whole train split (else the corpus cache has it)."""
        return self.train_file == "train.jsonl"

    @property
    def cache(self) -> Path:
        """The member's cache folder (tokenizer, token tensors, run)."""
        return CACHE / self.name

    @property
    def run_dir(self) -> Path:
        """Checkpoint and training log folder."""
        return self.cache / "run"


_GQA_256 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
_COMMON = dict(max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True)

MEMBERS: dict[str, Member] = {
    m.name: m
    for m in (
        Member(
            name="reference",
            family="qwen3_moe",
            role="tuning",
            corpus="reference",
            tokenizer="bpe:8192",
            config=dict(
                **_GQA_256,
                **_COMMON,
                intermediate_size=768,
                moe_intermediate_size=128,
                num_hidden_layers=4,
                num_experts=32,
                num_experts_per_tok=4,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                rope_theta=10000.0,
            ),
            balance="aux",
            router_shape="softmax top-4 of 32, renormalised",
            steps=1200,
            home="evals/reference",
            train_file="train_sample.jsonl",
            experts_implementation="eager",
            notes="lm-eval results on the offline tasks `ref_perplexity` and `ref_cloze`: "
            "`evals/reference/results_lm_eval.json` (`python evals/reference/run_lm_eval.py`); the per-layer "
            "expert load in more detail: `evals/reference/expert_load.json` (`python evals/reference/expert_load.py`).",
        ),
        Member(
            name="reference_sigmoid",
            family="glm4_moe",
            role="tuning",
            corpus="reference",
            tokenizer="member:reference",
            config=dict(
                **_GQA_256,
                **_COMMON,
                intermediate_size=768,  # unused: every layer is MoE (first_k_dense_replace=0)
                moe_intermediate_size=128,
                num_hidden_layers=4,
                first_k_dense_replace=0,
                attention_bias=True,  # GLM-4.5 has q/k/v biases
                use_qk_norm=False,
                partial_rotary_factor=0.5,  # GLM-4.5: rotary on half of each head
                n_routed_experts=32,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                n_shared_experts=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            balance="bias",
            router_shape="sigmoid + correction bias, top-4 of 32 in 4 groups (best 2), 1 shared expert",
            steps=1200,
            home="evals/reference_sigmoid",
            data="evals/reference/data",
            train_file="train_sample.jsonl",
            fp32_router=True,
            experts_implementation="eager",
        ),
        Member(
            name="mixtral",
            family="mixtral",
            role="validation",
            corpus="pydocs",
            tokenizer="bpe:4096",
            config=dict(
                **_GQA_256,
                **_COMMON,
                intermediate_size=384,
                num_hidden_layers=4,
                num_local_experts=8,
                num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            balance="aux",
            router_shape="softmax top-2 of 8, renormalised",
            notes="Schedule: an 800-step cosine schedule first (4.2 epochs; validation perplexity still fell 5% "
            "over its last 20%), then continued from step 800 on a 2000-step cosine schedule (a warm restart at lr "
            "1.35e-3; 10.5 epochs, on 2 CPU threads; the curve still moved 1.57% over its last 20%), then two warm "
            "restarts of 500 steps on 1 thread at a twentieth and a fortieth of the peak learning rate "
            "(`--extend 500 --extend-lr 1e-4`, then `5e-5`). The validation perplexity rose after the first "
            "restart, from its lowest, 129.1 at step 2000, to about 131 (held-out text had stopped improving), "
            "and then stayed flat within 0.74% over the last 600 steps: 15.7 epochs in all.",
            steps=2000,
            warmup=50,
            eval_every=40,
            eval_blocks=64,
        ),
        Member(
            name="olmoe",
            family="olmoe",
            role="validation",
            corpus="reference",
            tokenizer="bpe:16384",
            config=dict(
                **_COMMON,
                hidden_size=256,
                num_attention_heads=4,
                num_key_value_heads=4,
                intermediate_size=48,
                num_hidden_layers=4,
                num_experts=64,
                num_experts_per_tok=8,
                norm_topk_prob=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            balance="aux",
            router_shape="softmax top-8 of 64, not renormalised",
            notes="Schedule: 600 steps (1000 were planned) so that training fits about 40 minutes on one "
            "thread of the shared 2-core machine; that is a fraction of an epoch of this large train split, "
            "so this member is not trained to convergence.",
            steps=600,
            data="evals/reference/data",
            train_file="train_sample.jsonl",
        ),
        Member(
            name="deepseek_v3",
            family="deepseek_v3",
            role="validation",
            corpus="wiki",
            tokenizer="path:tests/assets/qwen3_tokenizer",
            config=dict(
                **_COMMON,
                hidden_size=128,
                intermediate_size=384,
                moe_intermediate_size=32,
                num_hidden_layers=5,
                first_k_dense_replace=1,
                num_attention_heads=4,
                num_key_value_heads=4,
                q_lora_rank=64,
                kv_lora_rank=32,
                qk_nope_head_dim=32,
                qk_rope_head_dim=16,
                v_head_dim=32,
                n_routed_experts=64,
                num_experts_per_tok=6,
                n_group=8,
                topk_group=4,
                n_shared_experts=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            balance="bias",
            router_shape="sigmoid + correction bias, top-6 of 64 in 8 groups (best 4), 1 shared expert, "
            "first layer dense",
            notes="Schedule: a 500-step cosine schedule first (1.1 epochs; 1200 steps were planned, cut to fit "
            "about 40 minutes on one thread of the shared 2-core machine: the 151,936-row embedding and head make "
            "a step cost 3-4.5 s), then one warm restart of 1200 steps at lr 1.5e-3 (`--extend 1200 --extend-lr "
            "1.5e-3`), also on one thread: 3.8 epochs in all. Not trained to convergence: validation perplexity "
            "still fell 2.8% over the last 20% of steps (the curve's points on the first 24,576 validation "
            "tokens).",
            steps=500,
            batch_size=4,
            doc_sep="<|endoftext|>",
            vocab_size=151936,
            fp32_router=True,
        ),
        Member(
            name="gpt_oss",
            family="gpt_oss",
            role="validation",
            corpus="fortunes",
            tokenizer="bpe:8192",
            config=dict(
                **_GQA_256,
                **_COMMON,
                intermediate_size=96,
                num_hidden_layers=4,
                num_local_experts=32,
                num_experts_per_tok=4,
                sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            balance="aux",
            router_shape="top-4 of 32 on the biased router logits, softmax over the 4",
            notes="Schedule: 1100 steps (2800 were planned), sized from the first steps' speed for about 40 "
            "minutes on one thread of the shared 2-core machine (it then ran slower under load); its "
            "validation perplexity still fell 1.67% over the last 20%, so a warm restart of 500 steps at "
            "a tenth of the peak learning rate (`--extend 500 --extend-lr 1e-4`) continued it until the "
            "curve was flat.",
            steps=1100,
            warmup=50,
            eval_every=50,
            eval_blocks=169,  # the whole validation split: a curve point moves by noise < 1%
        ),
    )
}


def get_member(name: str) -> Member:
    """The member called ``name``.

    Raises:
        SystemExit: naming the known members, if there is none.
    """
    if name not in MEMBERS:
        raise SystemExit(f"zoo: no member {name!r}; members: {', '.join(MEMBERS)}")
    return MEMBERS[name]
