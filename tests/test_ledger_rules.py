"""Ledger rules: every rejection is decided deterministically and kept in the chain."""

from __future__ import annotations

import json

import pytest

from ledger import entries as E
from ledger.chain import read_blocks, verify
from ledger.genesis import make_consortium
from ledger.identity import Signer, generate_key, public_key_hex
from ledger.rules import LedgerState
from ledger.store import Ledger

BASE = "00" * 32
MODEL_1 = "11" * 32


def h(tag: str) -> str:
    """A distinct 64-hex hash for a readable tag."""
    import hashlib

    return hashlib.sha256(tag.encode()).hexdigest()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return make_consortium(tmp_path_factory.mktemp("consortium"), hospitals=3)


class Clock:
    """Timestamps supplied by the caller, one second apart."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def ledger(tmp_path, consortium):
    led = Ledger(tmp_path / "replica-0", consortium.genesis)
    yield led
    led.close()


@pytest.fixture
def s(consortium):
    return consortium.signers


def submit(ledger: Ledger, *raws: bytes):
    """Commit one Raft entry holding ``raws``; returns the verdicts as (ok, reason)."""
    block = ledger.apply_batch(ledger.applied_raft_index + 1, list(raws))
    return [(e.accepted, e.reason) for e in block.entries]


def open_round(ledger, s, clock, r=0, base=BASE):
    return submit(ledger, E.round_open(s["coordinator"], round=r, base_model_hash=base,
                                       timestamp=clock()))


def update(s, clock, hospital="hospital-00", r=0, base=BASE, tag="u0", **kw):
    return E.model_update(s[hospital], round=r, base_model_hash=base,
                          update_hash=h(tag), num_samples=100, timestamp=clock(), **kw)


def test_honest_round_is_accepted(ledger, s):
    clock = Clock()
    assert open_round(ledger, s, clock) == [(True, None)]
    verdicts = submit(
        ledger,
        update(s, clock, "hospital-00", tag="a"),
        update(s, clock, "hospital-01", tag="b",
               privacy_spent={"epsilon": 0.5, "delta": 1e-5}),
        E.privacy_spend(s["hospital-01"], round=0, epsilon=0.5, delta=1e-5,
                        accountant="prv", timestamp=clock()),
    )
    assert verdicts == [(True, None)] * 3
    assert submit(ledger, E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                                         update_hashes=[h("a"), h("b")],
                                         timestamp=clock())) == [(True, None)]
    assert submit(ledger, E.prediction_audit(s["server"], root=h("preds"), count=50,
                                             model_hash=MODEL_1, timestamp=clock())) \
        == [(True, None)]
    assert ledger.state.latest_model == MODEL_1
    assert ledger.state.epsilon_spent("hospital-01") == 0.5
    assert ledger.state.audited_predictions == 50


def test_replayed_entry_and_second_update_are_rejected(ledger, s):
    clock = Clock()
    open_round(ledger, s, clock)
    first = update(s, clock, tag="a")
    second = update(s, clock, tag="other")
    verdicts = submit(ledger, first, first, second)
    assert verdicts[0] == (True, None)
    assert verdicts[1][0] is False and verdicts[1][1].startswith("replay: nonce")
    assert verdicts[2] == (
        False, "replay: hospital-00 already sent an update for round 0"
    )


def test_forged_updates_are_rejected(ledger, s, consortium):
    clock = Clock()
    open_round(ledger, s, clock)

    # Signed by a key the consortium does not know, under a member's name.
    impostor = Signer("hospital-00", generate_key())
    forged = update({"hospital-00": impostor}, clock, tag="forged")
    # A genuine entry whose body was altered after signing.
    genuine = json.loads(update(s, clock, "hospital-01", tag="real"))
    genuine["body"]["num_samples"] = 10_000
    tampered = E.canonical(genuine)
    # A signer that is no member at all.
    stranger = update({"hospital-99": Signer("hospital-99", generate_key())}, clock,
                      "hospital-99", tag="x")

    assert submit(ledger, forged, tampered, stranger) == [
        (False, "bad signature from 'hospital-00'"),
        (False, "bad signature from 'hospital-01'"),
        (False, "unknown signer 'hospital-99'"),
    ]


def test_stale_updates_are_rejected(ledger, s):
    clock = Clock()
    open_round(ledger, s, clock)
    wrong_base = update(s, clock, "hospital-00", base=h("old model"), tag="a")
    future = update(s, clock, "hospital-01", r=3, tag="b")
    assert submit(ledger, wrong_base, future) == [
        (False, f"stale: built on {h('old model')[:12]}, round 0 uses {BASE[:12]}"),
        (False, "round 3 is not open (latest round 0)"),
    ]

    submit(ledger, update(s, clock, "hospital-02", tag="c"))
    submit(ledger, E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                                  update_hashes=[h("c")], timestamp=clock()))
    late = update(s, clock, "hospital-01", r=0, tag="late")
    assert submit(ledger, late) == [
        (False, "stale: round 0 is closed (latest round 0)")
    ]

    # The next round must build on the global model just accepted.
    assert open_round(ledger, s, clock, r=1, base=BASE)[0][1].startswith("stale")
    assert open_round(ledger, s, clock, r=1, base=MODEL_1) == [(True, None)]
    old = update(s, clock, "hospital-01", r=1, base=BASE, tag="old-base")
    assert submit(ledger, old)[0][1].startswith("stale: built on")


def test_role_violations_are_rejected(ledger, s, consortium):
    clock = Clock()
    open_round(ledger, s, clock)
    by_server = E.model_update(s["server"], round=0, base_model_hash=BASE,
                               update_hash=h("s"), num_samples=1, timestamp=clock())
    for_other = E.sign_entry(
        s["hospital-00"], E.MODEL_UPDATE,
        {"hospital": "hospital-01", "round": 0, "base_model_hash": BASE,
         "update_hash": h("o"), "num_samples": 1, "privacy_spent": None},
        timestamp=clock())
    global_by_hospital = E.global_model(s["hospital-00"], round=0, model_hash=MODEL_1,
                                        update_hashes=[h("o")], timestamp=clock())
    open_by_auditor = E.round_open(s["auditor"], round=5, base_model_hash=BASE,
                                   timestamp=clock())
    add_by_coordinator = E.member_change(
        s["coordinator"], action="add", member_id="hospital-77", org="x",
        role="hospital", public_key=public_key_hex(generate_key()), timestamp=clock())
    spend_for_other = E.sign_entry(
        s["hospital-01"], E.PRIVACY_SPEND,
        {"hospital": "hospital-02", "round": 0, "epsilon": 1.0, "delta": 1e-5,
         "accountant": "rdp"}, timestamp=clock())
    audit_by_hospital = E.prediction_audit(s["hospital-00"], root=h("r"), count=1,
                                           model_hash=MODEL_1, timestamp=clock())

    verdicts = submit(ledger, by_server, for_other, global_by_hospital,
                      open_by_auditor, add_by_coordinator, spend_for_other,
                      audit_by_hospital)
    assert [ok for ok, _ in verdicts] == [False] * 7
    assert verdicts[0][1] == ("role violation: server has role server; "
                              "model_update needs role hospital")
    assert verdicts[1][1] == (
        "role violation: hospital-00 sent an update for hospital-01"
    )
    assert "global_model needs role coordinator" in verdicts[2][1]
    assert verdicts[3][1] == (
        "role violation: auditor has role auditor; round_open needs role coordinator"
    )
    assert "member_change needs role admin" in verdicts[4][1]
    assert "reported privacy spent by hospital-02" in verdicts[5][1]
    assert "prediction_audit needs role server" in verdicts[6][1]
    assert "hospital-77" not in ledger.state.members


def test_global_model_naming_unknown_or_rejected_updates(ledger, s):
    clock = Clock()
    open_round(ledger, s, clock)
    submit(ledger, update(s, clock, "hospital-00", tag="good"),
           update(s, clock, "hospital-01", base=h("stale"), tag="bad"))
    unknown = E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                             update_hashes=[h("good"), h("never sent")],
                             timestamp=clock())
    rejected = E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                              update_hashes=[h("good"), h("bad")], timestamp=clock())
    assert submit(ledger, unknown, rejected) == [
        (False, "global model names updates not on the ledger: "
                f"['{h('never sent')[:12]}']"),
        (False, f"global model names rejected updates: ['{h('bad')[:12]}']"),
    ]
    assert ledger.state.round_open and ledger.state.latest_model is None


def test_malformed_entries_are_recorded_with_the_parse_error(ledger, s):
    clock = Clock()
    valid = json.loads(update(s, clock, tag="a"))
    del valid["body"]["num_samples"]
    missing_field = E.canonical(valid)
    spaced = json.dumps(json.loads(update(s, clock, tag="b"))).encode()
    verdicts = submit(ledger, b"\xff\xfe", missing_field, spaced)
    assert verdicts[0][1].startswith("malformed: not UTF-8 JSON")
    assert verdicts[1][1] == ("malformed: model_update body: missing ['num_samples'], "
                              "unexpected []")
    assert verdicts[2][1] == ("malformed: entry is not in canonical encoding "
                              "(sorted, compact JSON)")


def test_member_changes_take_effect_in_order(ledger, s):
    clock = Clock()
    new_key = Signer("hospital-09", generate_key())
    add = E.member_change(s["admin"], action="add", member_id="hospital-09",
                          org="St Elsewhere", role="hospital",
                          public_key=new_key.public_key, timestamp=clock())
    open_round(ledger, s, clock)
    before = update({"hospital-09": new_key}, clock, "hospital-09", tag="pre")
    after = update({"hospital-09": new_key}, clock, "hospital-09", tag="post")
    remove = E.member_change(s["admin"], action="remove", member_id="hospital-09",
                             org="St Elsewhere", role="hospital",
                             public_key=new_key.public_key, timestamp=clock())
    removed = E.sign_entry(new_key, E.PRIVACY_SPEND,
                           {"hospital": "hospital-09", "round": 0, "epsilon": 1.0,
                            "delta": 1e-5, "accountant": "prv"}, timestamp=clock())
    last_admin = E.member_change(s["admin"], action="remove", member_id="admin",
                                 org="admin", role="admin",
                                 public_key=s["admin"].public_key, timestamp=clock())
    assert submit(ledger, before, add, after, remove, removed, last_admin) == [
        (False, "unknown signer 'hospital-09'"),
        (True, None),
        (True, None),
        (True, None),
        (False, "unknown signer 'hospital-09'"),
        (False, "removing 'admin' would leave no admin"),
    ]


def test_privacy_spends_are_cumulative_and_once_per_round(ledger, s):
    clock = Clock()
    open_round(ledger, s, clock)

    def spend(eps, r=0):
        return E.privacy_spend(s["hospital-00"], round=r, epsilon=eps, delta=1e-5,
                               accountant="prv", timestamp=clock())

    submit(ledger, update(s, clock, tag="a"))
    submit(ledger, E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                                  update_hashes=[h("a")], timestamp=clock()))
    open_round(ledger, s, clock, r=1, base=MODEL_1)
    verdicts = submit(ledger, spend(1.0), spend(1.5), spend(0.7, r=1), spend(2.0, r=1),
                      spend(3.0, r=4))
    assert verdicts[0] == (True, None)
    assert verdicts[1] == (
        False, "replay: hospital-00 already reported privacy for round 0"
    )
    assert verdicts[2][1].startswith("epsilon 0.7 is below hospital-00's previous 1.0")
    assert verdicts[3] == (True, None)
    assert verdicts[4][1] == "round 4 has not been opened (latest round 1)"
    assert ledger.state.epsilon_spent("hospital-00") == 2.0


def test_rejections_are_in_the_chain_and_survive_reopen(tmp_path, consortium, s):
    clock = Clock()
    led = Ledger(tmp_path / "r", consortium.genesis)
    open_round(led, s, clock)
    submit(led, update(s, clock, base=h("stale"), tag="x"), b"not an entry")
    led.close()

    blocks, problem = read_blocks(tmp_path / "r")
    assert problem is None
    stored = [(e.accepted, e.reason) for b in blocks for e in b.entries]
    assert stored[1][1].startswith("stale: built on")
    assert stored[2][1].startswith("malformed:")
    assert verify(tmp_path / "r", consortium.genesis.hash()).ok

    again = Ledger(tmp_path / "r", consortium.genesis)
    rejected = again.records(accepted=False)
    assert [r.reason for r in rejected] == [stored[1][1], stored[2][1]]
    assert again.records(member="hospital-00", type="model_update")[0].accepted is False
    again.close()


def test_state_snapshot_restore_gives_same_hash_and_behaviour(ledger, s, consortium):
    clock = Clock()
    open_round(ledger, s, clock)
    submit(ledger, update(s, clock, tag="a"), update(s, clock, "hospital-01", tag="b"))

    data = ledger.state.snapshot()
    copy = LedgerState.restore(data)
    assert copy.state_hash() == ledger.state.state_hash()
    assert copy.snapshot() == data

    nxt = [update(s, clock, "hospital-02", tag="c"), update(s, clock, tag="dup"),
           E.global_model(s["coordinator"], round=0, model_hash=MODEL_1,
                          update_hashes=[h("a"), h("c")], timestamp=clock())]
    seq = ledger.state.applied_index
    original = [ledger.state.apply(raw, seq + i + 1) for i, raw in enumerate(nxt)]
    restored = [copy.apply(raw, seq + i + 1) for i, raw in enumerate(nxt)]
    assert original == restored
    assert [o.accepted for o in original] == [True, False, True]
    assert copy.state_hash() == ledger.state.state_hash()


def test_corrupt_state_snapshot_is_a_clear_error():
    with pytest.raises(ValueError, match="unreadable ledger state snapshot"):
        LedgerState.restore(b'{"members": []}')
