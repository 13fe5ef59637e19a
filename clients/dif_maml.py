"""The Dif-MAML agent as a Flower ``ClientApp``: combine (eq. 6b), adapt (eqs. 4, 6a), reply with ``phi_k``.

The server is a relay (:class:`fedmeta.strategies.DifMAML`, whose docstring lists the message keys). A
train message carries the states ``phi_l`` of the agent's neighbourhood (ArrayRecords ``phi-<l>``) and
the weights ``a_lk``; the agent combines them, runs :func:`fedmeta.dif_maml.agent_round` (its batches
are drawn from ``(seed, agent, round)``: no data package needed, sine tasks are generated) and replies
with its new ``phi_k``. Its optimizer state (Adam's moments, dif-maml Appendix D.1) persists across
rounds in ``context.state`` (:func:`load_optimizer_state` / :func:`save_optimizer_state`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmeta import config as C
from fedmeta.clients.memory import partition_id
from fedmeta.dif_maml import DifMAMLConfig, agent_round, combine, init_optimizer_state
from fedmeta.meta import Params

CONFIG_FIELDS = frozenset(f.name for f in fields(DifMAMLConfig))


def parse_config(values: Mapping[str, Any]) -> DifMAMLConfig:
    """The :class:`DifMAMLConfig` among a message's config values (other keys, e.g. the relay's, ignored)."""
    return DifMAMLConfig.from_mapping({k: v for k, v in values.items() if k.replace("-", "_") in CONFIG_FIELDS})


def load_optimizer_state(context: Context, w: Params, cfg: DifMAMLConfig) -> Params:
    """The agent's optimizer state from ``context.state``; on its first round (nothing stored) fresh
    moments (:func:`fedmeta.dif_maml.init_optimizer_state`)."""
    if C.DIF_MAML_OPTIMIZER not in context.state:
        return init_optimizer_state(w, cfg)
    return dict(context.state[C.DIF_MAML_OPTIMIZER].to_torch_state_dict())


def save_optimizer_state(context: Context, state: Params) -> None:
    """Keep the optimizer state (an ArrayRecord survives the ClientApp being rebuilt or run in a new process)."""
    if state:  # SGD has none
        context.state[C.DIF_MAML_OPTIMIZER] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def neighbour_states(msg: Message, neighbourhood: Sequence[int]) -> list[Params]:
    """The ``phi_l`` the message carries, in ``neighbourhood`` order."""
    records = msg.content.array_records
    missing = [l for l in neighbourhood if f"{C.PHI_PREFIX}{l}" not in records]
    if missing:
        raise ValueError(f"the train message names agents {missing} in {C.NEIGHBOURHOOD} but carries no {C.PHI_PREFIX}<l> for them")
    return [dict(records[f"{C.PHI_PREFIX}{l}"].to_torch_state_dict()) for l in neighbourhood]


def dif_maml_train(msg: Message, context: Context) -> Message:
    """One Dif-MAML round of the agent this node is: eq. (6b), then eqs. (4) and (6a)."""
    cfg_record = msg.content.config_records["config"]
    cfg = parse_config(cfg_record)
    agent, server_round = int(cfg_record[C.AGENT]), int(cfg_record[C.SERVER_ROUND])
    pid = partition_id(context)
    if agent != pid:
        raise ValueError(f"the message is for {C.AGENT}={agent} but this node is {C.PARTITION_ID}={pid}")
    ids = [int(l) for l in cfg_record[C.NEIGHBOURHOOD]]
    weights = [float(a) for a in cfg_record[C.COMBINATION_WEIGHTS]]
    if len(ids) != len(weights) or agent not in ids:
        raise ValueError(f"{C.NEIGHBOURHOOD} {ids} must include agent {agent} and align with {C.COMBINATION_WEIGHTS} {weights}")
    w = combine(neighbour_states(msg, ids), weights)  # eq. (6b)
    state = load_optimizer_state(context, w, cfg)
    phi, state = agent_round(cfg, agent, server_round, w, state)  # eqs. (4), (6a)
    save_optimizer_state(context, state)
    metrics = MetricRecord({C.NUM_EXAMPLES: 2 * cfg.shots * cfg.tasks_per_agent})  # x_in and x_o of every task
    info = ConfigRecord({C.PARTITION_ID: pid})
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in phi.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, C.CLIENT_INFO: info}), reply_to=msg)


def make_dif_maml_client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    """The Dif-MAML ``ClientApp``: ``query`` -> the node's ``partition-id`` (its agent id), ``train`` ->
    :func:`dif_maml_train`. ``mods``: Flower client mods around both handlers."""
    app = ClientApp(mods=list(mods))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({C.PARTITION_ID: partition_id(context)})}), reply_to=msg)

    app.train()(dif_maml_train)
    return app


__all__ = ["dif_maml_train", "load_optimizer_state", "make_dif_maml_client_app", "parse_config", "save_optimizer_state"]
