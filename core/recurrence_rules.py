"""The recurrence rules of the language, one entry each: the word of ``update RULE(RATE, OPTION = VALUE)``,
what the rule computes (one line, for ``attnc show`` and ``.source``), its options and the facts its
checks depend on. The checker, the CLI and the call checks read this table; a rule's implementation (its
token-by-token reference, chunked forms, kernels and decoding step) registers under the same name in
``runtime.recurrences.rules``, its cost model in ``compiler.cost.recurrence_cost.RULE_COSTS``
(CONTRIBUTING.md: adding a rule)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuleFacts:
    """What the language says about one recurrence rule.

    - ``name``: the rule's word (``update delta(...)``); ``decay`` is the rule of a recurrence without an
      ``update`` clause.
    - ``title``: how messages and ``attnc show`` name it.
    - ``update``: the state update, one line, after the decay ``S_t = diag(exp(decay_t)) S_(t-1)``.
    - ``rates``: what the clause's positional arguments are, in order (each an input ``float[heads, n]``), named
      in errors; empty for a rule without an ``update`` clause.
    - ``options``: the clause's keyword options, each a constant bool.
    - ``grouped_values``: v may have more heads than q and k (grouped value attention: each value head reads
      the q/k head ``j // (Hv // H)``).
    - ``log_decay_gates``: the call's gates must be log decays (finite and <= 0, or -inf): the rule's chunked
      forms are exact only there (``runtime.recurrences.common.check_gates``).
    - ``channel_gates``: the decay may be per key channel (an input ``float[heads, n, dk]``).
    - ``state_rows``: the state is ``[B, H, state_rows * Dk, Dv]`` (Titans: the memory, then its momentum).
    """

    name: str
    title: str
    update: str
    rates: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    grouped_values: bool = False
    log_decay_gates: bool = False
    channel_gates: bool = True
    state_rows: int = 1


DECAY = RuleFacts("decay", "the decay rule", "S_t += k_t^T v_t")
DELTA = RuleFacts("delta", "the delta rule", "S_t += beta_t k_t^T (v_t - k_t S_t)",
                  rates=("the delta rule's rate",), options=("qk_l2norm",), grouped_values=True, log_decay_gates=True)
TITANS = RuleFacts("titans", "Titans' neural memory",
                   "m_t = eta_t m_(t-1) + theta_t k_t^T (v_t - k_t S_(t-1)); S_t += m_t",
                   rates=("Titans' learning rate theta", "Titans' momentum eta"), log_decay_gates=True,
                   channel_gates=False, state_rows=2)

#: Every rule by its word.
RULES: dict[str, RuleFacts] = {r.name: r for r in (DECAY, DELTA, TITANS)}
#: The rules an ``update`` clause may name.
UPDATE_RULES: dict[str, RuleFacts] = {name: r for name, r in RULES.items() if r.rates}
