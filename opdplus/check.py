"""Exact-enumeration verifier of the OPD / OPD+ estimators (the library behind `opdplus check`).

A tabular autoregressive student pi_theta and a fixed teacher q over a small vocabulary (one logit row
per prefix context) generate sequences of a fixed depth. Every sequence is enumerated, so both sides
are exact expectations, not Monte Carlo estimates:

* reference: autograd of the objective, written in the perspective form through
  ``exact_divergence``, J = sum_c P(c) D_f(q(.|c) || pi(.|c)) over all contexts c. With gamma = 1
  P(c) = pi_theta(c) carries gradient (the full objective J_f); with gamma = 0 it is held fixed.
* estimator: the exact expectation of -sum_t A_t grad log pi(y_t|c_t), with A_t from
  ``opdplus.advantages`` (the code the trainer runs) for "opd" and "opd_plus".

The relative error ||estimate - reference|| / ||reference|| is printed for every divergence. OPD+ must
be exact (<= 1e-8); stop-gradient OPD is exact only for reverse KL.

A second case (``run_cross_tokenizer_check``) does the same with a teacher whose tokenizer merges a pair of
the student's characters: the span advantage of ``opdplus.ops.align`` must be exact for every divergence,
and the naive span reward-to-go must be biased (docs/derivations.md, "A teacher with another tokenizer").
A third (``run_multiturn_check``) puts an environment token, not sampled by the student and not in the loss,
between student tokens (docs/derivations.md, "Multi-turn episodes").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from opdplus.ops.advantages import ESTIMATORS, advantages
from opdplus.ops.divergences import Divergence, divergence_names, get_divergence
from opdplus.ops.exact import exact_divergence

OPD_PLUS_TOLERANCE = 1e-8
GAMMAS = (0.0, 1.0)
ALPHAS = (0.5, -0.5, 2.0)


@dataclass(frozen=True)
class TabularProblem:
    """All prefixes (contexts) and all sequences of a depth-``depth`` process over ``vocab`` tokens."""

    vocab: int
    depth: int
    sequences_Y_D: torch.Tensor  # every sequence, one row each
    context_index_Y_D: torch.Tensor  # index of the context (prefix y_<t) of each position
    context_prefixes: list[tuple[int, ...]]

    @classmethod
    def build(cls, vocab: int, depth: int) -> TabularProblem:
        prefixes = [p for d in range(depth) for p in itertools.product(range(vocab), repeat=d)]
        index = {p: i for i, p in enumerate(prefixes)}
        sequences = list(itertools.product(range(vocab), repeat=depth))
        context_index = [[index[seq[:t]] for t in range(depth)] for seq in sequences]
        return cls(vocab, depth, torch.tensor(sequences), torch.tensor(context_index), prefixes)


def token_logprobs(logits_C_V: torch.Tensor, problem: TabularProblem) -> torch.Tensor:
    """log p(y_t | y_<t) for every enumerated sequence and position, [Y, D]."""
    logp_C_V = torch.log_softmax(logits_C_V, dim=-1)
    return logp_C_V[problem.context_index_Y_D, problem.sequences_Y_D]


def context_logprobs(logits_C_V: torch.Tensor, problem: TabularProblem) -> torch.Tensor:
    """log p(c) of reaching every context (prefix), [C]."""
    logp_C_V = torch.log_softmax(logits_C_V, dim=-1)
    index = {p: i for i, p in enumerate(problem.context_prefixes)}
    values = []
    for prefix in problem.context_prefixes:
        total = logp_C_V.new_zeros(())
        for t, token in enumerate(prefix):
            total = total + logp_C_V[index[prefix[:t]], token]
        values.append(total)
    return torch.stack(values)


def reference_gradient(
    student_logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    problem: TabularProblem,
    div: Divergence,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, its exact gradient): sum_c P(c) D_f(q||pi)(c), P(c) differentiated iff gamma = 1."""
    theta = student_logits_C_V.detach().clone().requires_grad_(True)
    per_context_C = exact_divergence(theta[None], teacher_logits_C_V[None], div)[0]
    context_prob_C = context_logprobs(theta, problem).exp()
    if gamma == 0.0:
        context_prob_C = context_prob_C.detach()
    objective = (context_prob_C * per_context_C).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return objective.detach(), grad


def estimator_gradient(
    student_logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    problem: TabularProblem,
    div: Divergence,
    estimator: str,
    gamma: float,
) -> torch.Tensor:
    """Exact expectation over sequences of -sum_t A_t grad log pi(y_t|c_t)."""
    theta = student_logits_C_V.detach().clone().requires_grad_(True)
    student_logprobs_Y_D = token_logprobs(theta, problem)
    teacher_logprobs_Y_D = token_logprobs(teacher_logits_C_V, problem)
    loss_mask_Y_D = torch.ones_like(student_logprobs_Y_D, dtype=torch.bool)
    advantages_Y_D = advantages(
        student_logprobs_Y_D.detach(),
        teacher_logprobs_Y_D,
        loss_mask_Y_D,
        divergence=div,
        estimator=estimator,
        gamma=gamma,
    )
    sequence_prob_Y = student_logprobs_Y_D.detach().sum(-1).exp()
    surrogate = (sequence_prob_Y[:, None] * advantages_Y_D * student_logprobs_Y_D).sum()
    (grad,) = torch.autograd.grad(-surrogate, theta)
    return grad


def sampled_objective(
    student_logits_C_V: torch.Tensor, teacher_logits_C_V: torch.Tensor, problem: TabularProblem, div: Divergence
) -> torch.Tensor:
    """E_pi[sum_t f(u_t)] by enumeration, from f(l) (checks f against the perspective form)."""
    student_logprobs_Y_D = token_logprobs(student_logits_C_V, problem)
    log_ratio_Y_D = token_logprobs(teacher_logits_C_V, problem) - student_logprobs_Y_D
    return (student_logprobs_Y_D.sum(-1).exp() * div.f(log_ratio_Y_D).sum(-1)).sum()


def check_divergences() -> list[Divergence]:
    """Every registered divergence; ``alpha`` at several parameter values."""
    divs = []
    for name in divergence_names():
        if name == "alpha":
            divs.extend(get_divergence("alpha", alpha=a) for a in ALPHAS)
        else:
            divs.append(get_divergence(name))
    return divs


def run_check(vocab: int = 3, depth: int = 3, seed: int = 0, scale: float = 1.5) -> list[dict]:
    """One row per divergence: relative gradient errors per estimator and gamma, and objective error."""
    problem = TabularProblem.build(vocab, depth)
    generator = torch.Generator().manual_seed(seed)
    n_contexts = len(problem.context_prefixes)
    student_logits = scale * torch.randn(n_contexts, vocab, generator=generator, dtype=torch.float64)
    teacher_logits = scale * torch.randn(n_contexts, vocab, generator=generator, dtype=torch.float64)
    rows = []
    for div in check_divergences():
        objective, _ = reference_gradient(student_logits, teacher_logits, problem, div, 1.0)
        row = {
            "divergence": div.label,
            "direction": div.direction,
            "objective_error": abs(float(sampled_objective(student_logits, teacher_logits, problem, div) - objective))
            / max(abs(float(objective)), 1e-300),
        }
        for gamma in GAMMAS:
            _, reference = reference_gradient(student_logits, teacher_logits, problem, div, gamma)
            for estimator in ESTIMATORS:
                estimate = estimator_gradient(student_logits, teacher_logits, problem, div, estimator, gamma)
                error = float((estimate - reference).norm() / reference.norm())
                row[f"{estimator}/gamma{gamma:g}"] = error
        rows.append(row)
    return rows


def passed(rows: list[dict]) -> bool:
    return all(row[f"opd_plus/gamma{g:g}"] <= OPD_PLUS_TOLERANCE for row in rows for g in GAMMAS) and all(
        row["objective_error"] <= OPD_PLUS_TOLERANCE for row in rows
    )


def format_table(rows: list[dict], vocab: int, depth: int, seed: int) -> str:
    columns = [f"{e}/gamma{g:g}" for g in GAMMAS for e in ESTIMATORS]
    header = f"{'divergence':<18}" + "".join(f"{c:>18}" for c in columns)
    lines = [
        f"Exact enumeration: vocab {vocab}, depth {depth}, seed {seed}, {vocab**depth} sequences.",
        "Relative error ||E[estimator gradient] - exact gradient|| / ||exact gradient||",
        "(gamma 0: contexts held fixed; gamma 1: full objective J_f)",
        "",
        header,
        "-" * len(header),
    ]
    for row in rows:
        lines.append(f"{row['divergence']:<18}" + "".join(f"{row[c]:>18.2e}" for c in columns))
    lines.append("")
    worst_plus = max(row[f"opd_plus/gamma{g:g}"] for row in rows for g in GAMMAS)
    lines.append(
        f"opd_plus: worst error {worst_plus:.1e} (tolerance {OPD_PLUS_TOLERANCE:.0e}) -> "
        + ("unbiased for every divergence." if passed(rows) else "FAILED.")
    )
    others = [row for row in rows if row["divergence"] != "reverse_kl"]
    rkl = [row for row in rows if row["divergence"] == "reverse_kl"]
    if rkl:
        rkl_err = max(rkl[0][f"opd/gamma{g:g}"] for g in GAMMAS)
        verdict = "exact: u f'(u) = -1 is a constant baseline" if rkl_err < 1e-8 else "NOT exact"
        lines.append(f"opd (stop-gradient): reverse_kl error {rkl_err:.1e} ({verdict}).")
    if others:
        biased = [(row[f"opd/gamma{g:g}"], row["divergence"], g) for row in others for g in GAMMAS]
        low, high = min(biased), max(biased)
        lines.append(
            f"opd (stop-gradient) on every other divergence is biased: relative error from {low[0]:.0%} "
            f"({low[1]}, gamma {low[2]:g}) to {high[0]:.0%} ({high[1]}, gamma {high[2]:g})."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- a teacher with another tokenizer
#
# The student is tabular over single characters; the teacher's tokenizer merges the pair "ab" into one
# token (so whether "a" ends a teacher token depends on the next character: it looks ahead) and the teacher
# is tabular over its own token prefixes. J = E_pi[sum_k f(u_k)] over the spans of common boundaries
# (docs/derivations.md, "A teacher with another tokenizer"), gamma = 1, every sequence enumerated.

CROSS_CHARS = "abc"
CROSS_MERGE = "ab"
CROSS_ESTIMATORS = ("opd_plus", "opd", "naive")  # naive: span reward-to-go from t's own span (negative control)
NAIVE_MIN_ERROR = 1e-4  # the negative control must be visibly biased, or the check could not tell


def merge_pairs(text: str) -> list[str]:
    """The teacher's tokenization: ``CROSS_MERGE`` wherever it occurs (left to right), else single characters."""
    tokens, i = [], 0
    while i < len(text):
        step = len(CROSS_MERGE) if text.startswith(CROSS_MERGE, i) else 1
        tokens.append(text[i : i + step])
        i += step
    return tokens


def merge_pairs_final_bytes(prefix: str) -> int:
    """Characters of ``prefix`` whose teacher tokens no continuation can change: all but a trailing first
    character of the merged pair."""
    return len(prefix) - 1 if prefix.endswith(CROSS_MERGE[0]) else len(prefix)


@dataclass(frozen=True)
class CrossTokenizerProblem:
    """Every character sequence of length ``depth``, its spans against the merging teacher tokenizer, the span
    layouts (exact and naive) and the teacher's tokens, contexts indexed for a tabular teacher."""

    student: TabularProblem
    span_end_Y_D: torch.Tensor
    return_from_Y_D: torch.Tensor  # exact: first span not final before t
    naive_return_from_Y_D: torch.Tensor  # t's own span
    teacher_tokens: list[str]
    teacher_contexts: list[tuple[str, ...]]
    teacher_index_Y: list[list[tuple[int, int, int]]]  # per sequence: (context row, token id, span end column)

    @classmethod
    def build(cls, depth: int) -> CrossTokenizerProblem:
        from opdplus.ops.align import align_spans, return_from_tokens, span_layout

        student = TabularProblem.build(len(CROSS_CHARS), depth)
        teacher_tokens = [*CROSS_CHARS, CROSS_MERGE]
        contexts: dict[tuple[str, ...], int] = {}
        exact_rows, naive_rows, teacher_index = [], [], []
        for sequence in student.sequences_Y_D.tolist():
            text = "".join(CROSS_CHARS[i] for i in sequence)
            pieces = merge_pairs(text)
            spans = align_spans(
                list(range(1, depth + 1)), list(itertools.accumulate(map(len, pieces))), [True] * (depth + 1)
            )
            final = [merge_pairs_final_bytes(text[:t]) for t in range(depth)]
            exact_rows.append((0, spans, return_from_tokens(spans, final)))
            own = [next(s.student_start for s in spans if s.student_start <= t < s.student_stop) for t in range(depth)]
            naive_rows.append((0, spans, own))
            entries = []
            for span in spans:
                for z in range(span.teacher_start, span.teacher_stop):
                    row = contexts.setdefault(tuple(pieces[:z]), len(contexts))
                    entries.append((row, teacher_tokens.index(pieces[z]), span.student_stop - 1))
            teacher_index.append(entries)
        shape = (len(exact_rows), depth)
        span_end_Y_D, return_from_Y_D = span_layout(exact_rows, shape)
        _, naive_Y_D = span_layout(naive_rows, shape)
        return cls(student, span_end_Y_D, return_from_Y_D, naive_Y_D, teacher_tokens, list(contexts), teacher_index)

    def teacher_span_logprobs(self, teacher_logits_Z_V: torch.Tensor) -> torch.Tensor:
        """log q(span) at the column of each span's last character, 0 elsewhere, [Y, D]."""
        logq_Z_V = torch.log_softmax(teacher_logits_Z_V, dim=-1)
        out_Y_D = torch.zeros(self.span_end_Y_D.shape, dtype=teacher_logits_Z_V.dtype)
        for y, entries in enumerate(self.teacher_index_Y):
            for row, token, column in entries:
                out_Y_D[y, column] += logq_Z_V[row, token]
        return out_Y_D


def cross_tokenizer_objective(
    student_logits_C_V: torch.Tensor, teacher_span_Y_D: torch.Tensor, problem: CrossTokenizerProblem, div: Divergence
) -> torch.Tensor:
    """J = sum_y pi(y) sum_k f(log q(span_k) - log pi(span_k)), differentiable in the student logits."""
    from opdplus.ops.align import span_ends_mask, span_sums

    student_lp_Y_D = token_logprobs(student_logits_C_V, problem.student)
    is_end_Y_D = span_ends_mask(problem.span_end_Y_D)
    log_ratio_Y_D = teacher_span_Y_D - span_sums(student_lp_Y_D, problem.span_end_Y_D)
    f_Y_D = torch.where(is_end_Y_D, div.f(log_ratio_Y_D), torch.zeros_like(log_ratio_Y_D))
    return (student_lp_Y_D.sum(-1).exp() * f_Y_D.sum(-1)).sum()


def cross_tokenizer_estimator_gradient(
    student_logits_C_V: torch.Tensor,
    teacher_span_Y_D: torch.Tensor,
    problem: CrossTokenizerProblem,
    div: Divergence,
    estimator: str,
) -> torch.Tensor:
    """Exact expectation of -sum_t A_t grad log pi(y_t|c_t), A_t from ``opdplus.ops.align.span_advantages``
    (``naive``: OPD+ with each token's return starting at its own span)."""
    from opdplus.ops.align import span_advantages, spread_span_logprobs

    theta = student_logits_C_V.detach().clone().requires_grad_(True)
    student_lp_Y_D = token_logprobs(theta, problem.student)
    teacher_lp_Y_D = spread_span_logprobs(teacher_span_Y_D, student_lp_Y_D.detach(), problem.span_end_Y_D)
    return_from_Y_D = problem.naive_return_from_Y_D if estimator == "naive" else problem.return_from_Y_D
    advantages_Y_D = span_advantages(
        student_lp_Y_D.detach(),
        teacher_lp_Y_D,
        torch.ones_like(student_lp_Y_D, dtype=torch.bool),
        problem.span_end_Y_D,
        return_from_Y_D,
        divergence=div,
        estimator="opd_plus" if estimator == "naive" else estimator,
        gamma=1.0,
    )
    sequence_prob_Y = student_lp_Y_D.detach().sum(-1).exp()
    surrogate = (sequence_prob_Y[:, None] * advantages_Y_D * student_lp_Y_D).sum()
    (grad,) = torch.autograd.grad(-surrogate, theta)
    return grad


def run_cross_tokenizer_check(depth: int = 3, seed: int = 0, scale: float = 1.5) -> list[dict]:
    """One row per divergence: relative gradient error of OPD+, stop-gradient OPD and the naive span
    reward-to-go against autograd of J, all with the teacher's merging tokenizer, gamma = 1."""
    problem = CrossTokenizerProblem.build(depth)
    generator = torch.Generator().manual_seed(seed)
    student_logits = scale * torch.randn(
        len(problem.student.context_prefixes), len(CROSS_CHARS), generator=generator, dtype=torch.float64
    )
    teacher_logits = scale * torch.randn(
        len(problem.teacher_contexts), len(problem.teacher_tokens), generator=generator, dtype=torch.float64
    )
    teacher_span_Y_D = problem.teacher_span_logprobs(teacher_logits)
    rows = []
    for div in check_divergences():
        theta = student_logits.detach().clone().requires_grad_(True)
        (reference,) = torch.autograd.grad(cross_tokenizer_objective(theta, teacher_span_Y_D, problem, div), theta)
        row: dict = {"divergence": div.label, "direction": div.direction}
        for estimator in CROSS_ESTIMATORS:
            estimate = cross_tokenizer_estimator_gradient(student_logits, teacher_span_Y_D, problem, div, estimator)
            row[estimator] = float((estimate - reference).norm() / reference.norm())
        rows.append(row)
    return rows


def cross_tokenizer_passed(rows: list[dict]) -> bool:
    """OPD+ exact for every divergence, stop-gradient exact for reverse KL, the naive control biased."""
    return all(
        row["opd_plus"] <= OPD_PLUS_TOLERANCE
        and row["naive"] > NAIVE_MIN_ERROR
        and (row["divergence"] != "reverse_kl" or row["opd"] <= OPD_PLUS_TOLERANCE)
        for row in rows
    )


def format_cross_tokenizer_table(rows: list[dict], depth: int, seed: int) -> str:
    header = f"{'divergence':<18}" + "".join(f"{c:>18}" for c in CROSS_ESTIMATORS)
    lines = [
        f"Cross-tokenizer: student over single characters {CROSS_CHARS!r}, teacher tokenizer merges "
        f"{CROSS_MERGE!r}, depth {depth}, seed {seed}, {len(CROSS_CHARS) ** depth} sequences, gamma 1.",
        "Relative error against autograd of J = E_pi[sum over spans f(u_k)]; naive = span reward-to-go from the",
        "token's own span (the negative control: span ends are not stopping times).",
        "",
        header,
        "-" * len(header),
    ]
    lines += [f"{row['divergence']:<18}" + "".join(f"{row[c]:>18.2e}" for c in CROSS_ESTIMATORS) for row in rows]
    worst = max(row["opd_plus"] for row in rows)
    naive = [row["naive"] for row in rows]
    others = [row["opd"] for row in rows if row["divergence"] != "reverse_kl"]
    lines += [
        "",
        f"opd_plus across tokenizers: worst error {worst:.1e} -> "
        + ("unbiased for every divergence." if worst <= OPD_PLUS_TOLERANCE else "FAILED."),
        f"opd (stop-gradient): reverse_kl {next(r['opd'] for r in rows if r['divergence'] == 'reverse_kl'):.1e}; "
        f"every other divergence biased, {min(others):.0%} to {max(others):.0%}.",
        f"naive span reward-to-go: biased for every divergence, reverse_kl included: {min(naive):.1%} to "
        f"{max(naive):.1%}" + ("." if min(naive) > NAIVE_MIN_ERROR else " (NOT biased: the control FAILED)."),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- multi-turn: an environment token in the episode

# Who produces each position of the multi-turn case: s = the student samples it (in the loss), e = the
# environment draws it from a fixed distribution that does not depend on the student's parameters (not in the loss).
MULTITURN_TURNS = "ssess"


def episode_context_logprobs(
    student_logits_C_V: torch.Tensor, env_logits_C_V: torch.Tensor, problem: TabularProblem, turns: str
) -> torch.Tensor:
    """log P(c) of reaching every context when position t is drawn by the student (``turns[t] == "s"``) or by
    the environment (``"e"``), [C]."""
    student_logp_C_V = torch.log_softmax(student_logits_C_V, dim=-1)
    env_logp_C_V = torch.log_softmax(env_logits_C_V, dim=-1)
    index = {p: i for i, p in enumerate(problem.context_prefixes)}
    values = []
    for prefix in problem.context_prefixes:
        total = student_logp_C_V.new_zeros(())
        for t, token in enumerate(prefix):
            logp_C_V = student_logp_C_V if turns[t] == "s" else env_logp_C_V
            total = total + logp_C_V[index[prefix[:t]], token]
        values.append(total)
    return torch.stack(values)


def episode_reference_gradient(
    student_logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    env_logits_C_V: torch.Tensor,
    problem: TabularProblem,
    turns: str,
    div: Divergence,
    gamma: float,
) -> torch.Tensor:
    """The exact gradient of sum over the student's contexts c of P(c) D_f(q(.|c) || pi(.|c)), P(c) through both
    the student's and the environment's draws, differentiated iff gamma = 1."""
    theta = student_logits_C_V.detach().clone().requires_grad_(True)
    per_context_C = exact_divergence(theta[None], teacher_logits_C_V[None], div)[0]
    context_prob_C = episode_context_logprobs(theta, env_logits_C_V, problem, turns).exp()
    if gamma == 0.0:
        context_prob_C = context_prob_C.detach()
    student_context_C = torch.tensor([turns[len(p)] == "s" for p in problem.context_prefixes])
    objective = torch.where(student_context_C, context_prob_C * per_context_C, 0.0).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def episode_estimator_gradient(
    student_logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    env_logits_C_V: torch.Tensor,
    problem: TabularProblem,
    turns: str,
    div: Divergence,
    estimator: str,
    gamma: float,
) -> torch.Tensor:
    """Exact expectation over episodes of -sum_t A_t grad log pi(y_t|c_t), the advantages from ``advantages`` with
    ``loss_mask`` False at environment tokens (their log-probs are 0 there, as in a rollout batch)."""
    theta = student_logits_C_V.detach().clone().requires_grad_(True)
    student_logprobs_Y_D = token_logprobs(theta, problem)
    loss_mask_Y_D = torch.tensor([t == "s" for t in turns]).expand_as(student_logprobs_Y_D)
    zeros_Y_D = torch.zeros_like(student_logprobs_Y_D)
    sampler_logprobs_Y_D = torch.where(loss_mask_Y_D, student_logprobs_Y_D.detach(), zeros_Y_D)
    teacher_logprobs_Y_D = torch.where(loss_mask_Y_D, token_logprobs(teacher_logits_C_V, problem), zeros_Y_D)
    advantages_Y_D = advantages(
        sampler_logprobs_Y_D, teacher_logprobs_Y_D, loss_mask_Y_D, divergence=div, estimator=estimator, gamma=gamma
    )
    episode_logprob_Y_D = torch.where(loss_mask_Y_D, sampler_logprobs_Y_D, token_logprobs(env_logits_C_V, problem))
    episode_prob_Y = episode_logprob_Y_D.sum(-1).exp()
    surrogate = (episode_prob_Y[:, None] * advantages_Y_D * torch.where(loss_mask_Y_D, student_logprobs_Y_D, 0.0)).sum()
    (grad,) = torch.autograd.grad(-surrogate, theta)
    return grad


def run_multiturn_check(vocab: int = 3, turns: str = MULTITURN_TURNS, seed: int = 0, scale: float = 1.5) -> list[dict]:
    """The multi-turn case: student tokens, an environment token drawn from a random fixed distribution (never
    sampled by the student, not in the loss), student tokens again. One row per divergence with the relative
    gradient error of each estimator and gamma."""
    if set(turns) - {"s", "e"} or "s" not in turns:
        raise ValueError(
            f"turns must be a string of s (student) and e (environment) with at least one s, got {turns!r}"
        )
    problem = TabularProblem.build(vocab, len(turns))
    generator = torch.Generator().manual_seed(seed)
    n_contexts = len(problem.context_prefixes)
    student_logits, teacher_logits, env_logits = (
        scale * torch.randn(n_contexts, vocab, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    rows = []
    for div in check_divergences():
        row: dict = {"divergence": div.label, "direction": div.direction}
        for gamma in GAMMAS:
            reference = episode_reference_gradient(
                student_logits, teacher_logits, env_logits, problem, turns, div, gamma
            )
            for estimator in ESTIMATORS:
                estimate = episode_estimator_gradient(
                    student_logits, teacher_logits, env_logits, problem, turns, div, estimator, gamma
                )
                row[f"{estimator}/gamma{gamma:g}"] = float((estimate - reference).norm() / reference.norm())
        rows.append(row)
    return rows


def multiturn_passed(rows: list[dict]) -> bool:
    """OPD+ exact for every divergence and gamma; stop-gradient OPD exact for reverse KL only."""
    plus_exact = all(row[f"opd_plus/gamma{g:g}"] <= OPD_PLUS_TOLERANCE for row in rows for g in GAMMAS)
    rkl_exact = all(
        row[f"opd/gamma{g:g}"] <= OPD_PLUS_TOLERANCE
        for row in rows
        if row["divergence"] == "reverse_kl"
        for g in GAMMAS
    )
    others_biased = all(
        row[f"opd/gamma{g:g}"] > 1e-4 for row in rows if row["divergence"] != "reverse_kl" for g in GAMMAS
    )
    return plus_exact and rkl_exact and others_biased


def format_multiturn_table(rows: list[dict], vocab: int, turns: str, seed: int) -> str:
    columns = [f"{e}/gamma{g:g}" for g in GAMMAS for e in ESTIMATORS]
    header = f"{'divergence':<18}" + "".join(f"{c:>18}" for c in columns)
    producers = ", ".join("student" if t == "s" else "environment" for t in turns)
    lines = [
        f"Multi-turn episodes: vocab {vocab}, positions [{producers}], seed {seed}, {vocab ** len(turns)} episodes.",
        "The environment token is drawn from a fixed random distribution, never by the student, and is not in the",
        "loss; the discount counts student tokens only. Relative gradient error as above.",
        "",
        header,
        "-" * len(header),
    ]
    lines += [f"{row['divergence']:<18}" + "".join(f"{row[c]:>18.2e}" for c in columns) for row in rows]
    worst_plus = max(row[f"opd_plus/gamma{g:g}"] for row in rows for g in GAMMAS)
    lines += [
        "",
        f"opd_plus: worst error {worst_plus:.1e} -> "
        + ("unbiased for every divergence with the environment in the loop." if multiturn_passed(rows) else "FAILED."),
    ]
    return "\n".join(lines)
