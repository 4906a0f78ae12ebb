"""The cost model: primitive costs on this machine, per layer the least work and bytes the protocol
needs, and the predicted seconds of a query (:func:`predict_query`) before anyone pays for one.

:func:`measure_primitives` times the operations every protocol step is made of, for one key:
a modular multiplication mod N^2 and mod the DGK modulus, a CRT decryption, a DGK zero test, a
blinding exponentiation (exponent below u), and a short exponentiation per exponent bit.

:func:`layer_bound` counts, for one layer as the engine runs it (its own operation counters, the
model's bit bounds), the *minimum* operations the protocol needs, assuming every randomizer comes
from the offline pool, and prices them:

* reveal of n values of l bits (packed k per plaintext): per value slot = l + kappa + 3 squarings
  (the Horner shift) and one multiplication; per pack one re-randomisation (1 mult) and one CRT
  decryption at S2;
* linear layer, P positions x F fan-in x C channels, k positions per packed plaintext (slots of
  lc + kappa + 3 bits, lc = lx + 1 + b_B + ceil(log2 F), b_B = weight bits + kappa + 1, the mask
  width), G = ceil(P / k) position groups: S2 encrypts G x F packs (2 multiplications each, pooled
  randomizer); S1 unmasks them (1 multiplication each) and raises them to B by a shared-base w-bit
  window (w = ``WINDOW``): per packed MAC ceil(b_B / w) multiplications plus, per output pack, b_B
  squarings shared by all F bases; S1 masks and re-randomises the G x C result packs (2 multiplications
  each), S2 decrypts them and encrypts the P x C outputs (2 multiplications each); S1 assembles each
  output with 3 multiplications; a layer whose input a sibling layer revealed before has no reveal;
* comparison of l bits (ReLU, and each max of a max-pool): per bit one DGK encryption at S2 (1 mult
  with a pooled randomizer), at S1 3 multiplications (combination, randomizer) and, for the
  max(p, l + 1 - p) bits S1 must treat alike for either sign (:func:`blinded_positions`, ~60 %), one
  blinding exponentiation, at S2 one zero test; per element 2 Paillier encryptions at S2 (2 mults each), a few
  multiplications at S1 and, for a ReLU or max (not a truncation), one exponentiation E(-e)^M by the
  (l + kappa + 2)-bit mask;
* with the OT comparison (the default; ``comparison="ot"``) the per-bit DGK work is replaced by
  :func:`~he_cnn.protocols.millionaire.rot_count` random OTs per pass (the extension's cost per OT at
  each end, measured by :func:`measure_ot`) and their AND gates (numpy), 16 bytes per OT to S2 plus a
  few bits per gate each way; the reveal, S2's replies and S1's finishing step are the same;
* result for the user: a reveal of the class vector and 2 multiplications per value under each key.

The bound is that work divided by the number of cores (S1 and S2 take turns, so each may use every
core in its turn) — a floor no implementation of *this* protocol goes below on this machine; our
time / bound says how much is Python, dispatch, and work the protocol could avoid.
Bytes: the ciphertexts each round must carry at fixed width (packs, DGK bits, replies), no headers.

:func:`predict_query` turns the bound into a prediction for a whole query of any compiled model:
the bound of every layer times :data:`ENGINE_FACTOR` (how far the engine is from the bound, measured
on the ICNN by ``bench/bench.py``), plus the link's latency over the layer's rounds. The benchmark
prints the prediction beside the measurement for every zoo model.
"""
from __future__ import annotations

import math
import secrets
import time
from typing import Any, Callable

import gmpy2
import numpy as np
from gmpy2 import mpz

from he_cnn.crypto.paillier import KAPPA, generate_keypair
from he_cnn.geometry import pair
from he_cnn.graph.layers import Cost, Layer, layer_from_spec, linear_siblings
from he_cnn.protocols.common import slot_bits, slots_per_pack
from he_cnn.protocols.millionaire import product_width, requests_needed, rot_count

#: window of the shared-base exponentiation assumed by the bound (the engine's Straus window)
WINDOW = 4
#: S1 multiplications per compared element besides the bits (t or x*t assembly, batched inversion)
COMBINE_MULTS = 4
#: multiplications per compared bit at S1 besides the blinding exponentiation
BIT_MULTS = 3


def blinded_positions(low: int) -> float:
    """Expected blinding exponentiations per element comparing ``low`` bits (low + 1 positions).

    c_j can be zero only where rho'_j is 1 (s = +1) or 0 (s = -1); S1 exponentiates those and pads to
    max(p, low + 1 - p), p = popcount(rho') ~ Binomial(low, 1/2), so that the count does not depend on
    s (:func:`he_cnn.protocols.comparison.blind_bit_comparisons`)."""
    return sum(math.comb(low, p) * max(p, low + 1 - p) for p in range(low + 1)) / 2 ** low


def per_call(fn: Callable[[], Any], min_seconds: float, batch: int = 50) -> float:
    """Seconds per call of ``fn``: best of 3 runs of at least ``min_seconds / 3`` each."""
    best = math.inf
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            for _ in range(batch):
                fn()
            n += batch
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds / 3:
                break
        best = min(best, elapsed / n)
    return best


def measure_primitives(public, private, dgk_public=None, dgk_private=None, min_seconds: float = 0.3) -> dict[str, float]:
    """Seconds per primitive operation for these keys, single core (the DGK ones only with DGK keys:
    the OT comparison needs none)."""
    nsq, n = public.nsq, public.n
    a, b = mpz(secrets.randbelow(int(nsq))), mpz(secrets.randbelow(int(nsq)))
    c = public.encrypt(12345)
    e64 = mpz(secrets.randbits(64) | (1 << 63))
    prims = {
        "mulmod_nsq": per_call(lambda: a * b % nsq, min_seconds, 200),
        "decrypt_crt": per_call(lambda: private.decrypt_raw(c), min_seconds, 5),
        "exp_per_bit_nsq": per_call(lambda: gmpy2.powmod(c, e64, nsq), min_seconds, 20) / 64,
        "invert_nsq": per_call(lambda: gmpy2.invert(c, nsq), min_seconds, 20),
        "fresh_randomizer_nsq": per_call(public.fresh_randomizer, min_seconds, 5),
        "full_exp_nsq": per_call(lambda: gmpy2.powmod(c, n, nsq), min_seconds, 2),
    }
    if dgk_public is not None:
        dn = dgk_public.n
        da, db = mpz(secrets.randbelow(int(dn))), mpz(secrets.randbelow(int(dn)))
        dc = dgk_public.encrypt(1)
        p, v_p = dgk_private.p, dgk_private.v_p
        blind_exps = [mpz(1 + secrets.randbelow(dgk_public.u - 1)) for _ in range(64)]
        it = iter(range(1 << 62))

        def blind() -> mpz:
            return gmpy2.powmod(dc, blind_exps[next(it) & 63], dn)

        prims.update({
            "mulmod_dgk": per_call(lambda: da * db % dn, min_seconds, 200),
            "dgk_zero_test": per_call(lambda: gmpy2.powmod(dc, v_p, p), min_seconds, 20),
            "dgk_blind_exp": per_call(blind, min_seconds, 50),
            "fresh_randomizer_dgk": per_call(dgk_public.fresh_randomizer, min_seconds, 5),
        })
    prims.update(measure_ot(min_seconds))
    return {k: float(v) for k, v in prims.items()}


#: OTs per timed extension batch (a comparison call of the ICNN extends 10^4..10^5 at once)
OT_BATCH = 65_536


def measure_ot(min_seconds: float = 0.3) -> dict[str, float]:
    """Seconds per random OT of the extension (S1's side, S2's side) and per AND gate of the circuit
    (both parties, numpy), on a link made once here; the base OTs are per link, not per query."""
    from he_cnn.crypto import ot
    from he_cnn.protocols import millionaire

    sender = ot.BaseSender()
    s = ot.random_bits(ot.KAPPA_OT)
    bs, keys = ot.base_receive(int(sender.A), s)
    receiver, ot_sender = ot.OTReceiver("bench", sender.keys([int(b) for b in bs])), ot.OTSender(s, keys)
    batches: list = []

    def s1_side() -> None:
        batches.append(receiver.extend(OT_BATCH))

    def s2_side() -> None:
        b = batches.pop() if batches else receiver.extend(OT_BATCH)
        ot_sender.extend(b.batch, b.count, b.u)

    s1 = per_call(s1_side, min_seconds, 1) / OT_BATCH
    s2 = per_call(s2_side, min_seconds, 1) / OT_BATCH
    n, k = 4096, 16  # a circuit of this size, both parties, in plaintext with valid random OTs
    total = millionaire.rot_count(n, k) - n * k
    c, x0, x1 = ot.random_bits(total), ot.random_bits(total), ot.random_bits(total)
    a = millionaire.bit_matrix(list(range(n)), k)

    def circuit() -> None:
        one = millionaire.CircuitState(0, a.copy(), a.copy(), millionaire.receiver_triples(c, np.where(c == 1, x1, x0)),
                                       millionaire.level_widths(k))
        two = millionaire.CircuitState(1, a.copy(), a.copy(), millionaire.sender_triples(x0, x1),
                                       millionaire.level_widths(k))
        pending = [two.open()]
        while True:
            ops = millionaire.s1_round(one, pending)
            if not ops:
                return
            pending = millionaire.s2_round(two, ops)

    gates = (millionaire.rot_count(n, k) - n * k) // 2
    return {"ot_s1": s1, "ot_s2": s2, "and_gate": per_call(circuit, min_seconds, 1) / gates}


def tensor_bits(spec: dict, tensor: str) -> int:
    """Bit length of a tensor's worst-case bound, from the public spec (``bits``; older specs: ``bounds``)."""
    if "bits" in spec:
        return int(spec["bits"][tensor])
    return int(spec["bounds"][tensor]).bit_length()


def _reveal(n_values: int, l: int, bits: int, prim: dict[str, float], kappa: int = KAPPA) -> tuple[float, float, int, int]:
    """(S1 seconds, S2 seconds, packs, S1 multiplications mod N^2) for revealing n values of l bits."""
    slot = slot_bits(l, kappa)
    k = slots_per_pack(bits, slot)
    packs = -(-n_values // k)
    mults = n_values * (slot + 1) + packs
    return mults * prim["mulmod_nsq"], packs * prim["decrypt_crt"], packs, mults


def _catalogue_cost(entry: dict, spec: dict) -> Cost:
    """The catalogue's cost of one spec layer (its class's :meth:`~he_cnn.graph.layers.Layer.cost`)."""
    layer = layer_from_spec(entry)
    return layer.cost([tuple(spec["shapes"][s]) for s in layer.sources()],
                      [tensor_bits(spec, s) for s in layer.sources()])


def linear_packing(entry: dict, spec: dict, bits: int, kappa: int = KAPPA) -> tuple[int, int, int, int, int, int]:
    """A linear layer's packed cross terms at this key size: (positions P, taps F, mask bits b_B,
    cross-term bits lc, positions per plaintext k, position groups G = ceil(P / k))."""
    positions, taps, _, _, lx = _catalogue_cost(entry, spec).linear
    # B = 2^lw + r, r < 2^(lw + 1 + kappa): lw + kappa + 1 bits, one more only with probability
    # 2^-(kappa + 1) per weight (the engine uses the actual largest B)
    b_mask = int(entry["weight_bits"]) + kappa + 1
    lc = lx + 1 + b_mask + max(0, taps - 1).bit_length()
    k = slots_per_pack(bits, slot_bits(lc, kappa))
    return positions, taps, b_mask, lc, k, -(-positions // k)


def layer_bound(entry: dict, spec: dict, layer, bits: int, prim: dict[str, float], cores: int,
                ct_bytes: int, dgk_bytes: int, user_ct_bytes: int, user_mulmod: float,
                kappa: int = KAPPA, comparison: str = "ot") -> dict[str, Any]:
    """Least work (S1, S2 single-core seconds), the bound on ``cores``, least bytes each way, and the
    operation counts behind them (``counts``: decryptions, encryptions, zero tests, exponentiations by
    exponent size, modular multiplications). A layer's work comes from its catalogue class's
    :class:`~he_cnn.graph.layers.Cost` (a packed linear product, comparison passes, or nothing);
    ``layer.kind == "to_user"`` is the result's re-encryption, which is not a layer."""
    shapes = spec["shapes"]
    mm, mmd = prim["mulmod_nsq"], prim.get("mulmod_dgk", 0.0)
    s1 = s2 = 0.0
    to_s2 = to_s1 = 0
    elements = 0
    detail: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    cost = _catalogue_cost(entry, spec) if layer.kind != "to_user" else Cost()
    if cost.linear:
        _, _, c_out, n_in, lx = cost.linear
        positions, taps, b_mask, lc, k, groups = linear_packing(entry, spec, bits, kappa)
        macs = positions * taps * c_out
        r1, r2, packs, reveal_mults = _reveal(n_in, lx, bits, prim, kappa)
        siblings = linear_siblings([layer_from_spec(e) for e in spec["layers"]])
        if entry["name"] in siblings.get(entry["input"], [entry["name"]])[1:]:
            r1 = r2 = packs = reveal_mults = 0  # a sibling's reveal of the same input serves this layer
        outputs = positions * c_out
        z_packs = groups * c_out
        s1_mults = (reveal_mults + groups * taps  # unmask the packs S2 sends
                    + groups * taps * c_out * math.ceil(b_mask / WINDOW) + z_packs * b_mask  # packed Straus
                    + 2 * z_packs + outputs * 3)  # mask + re-randomise the Z packs; assemble outputs
        s2_encryptions = groups * taps + outputs
        s1, s2 = s1_mults * mm, r2 + z_packs * prim["decrypt_crt"] + s2_encryptions * 2 * mm
        to_s2, to_s1 = (packs + z_packs) * ct_bytes, (groups * taps + outputs) * ct_bytes
        elements = outputs
        detail = {"macs": macs, "mask_bits": b_mask, "inputs": n_in, "input_bits": lx, "packs": packs,
                  "outputs": outputs, "cross_bits": lc, "positions_per_pack": k}
        counts = {"decryptions": packs + z_packs, "paillier_encryptions": s2_encryptions,
                  "mulmod_nsq": s1_mults + 2 * s2_encryptions, "exp_bits_online": {b_mask: groups * taps * c_out}}
    elif cost.passes:
        # two-round passes (elements, revealed bits, compared low bits): a ReLU compares |x| < 2^l on
        # l + 1 bits; a max compares a - b, one bit more; a shift k first truncates (the low k bits of
        # every input element) and leaves l - k bits for the rest
        passes = cost.passes
        compared_bits = sum(m * (low + 1) for m, _, low in passes)
        packs = reveal_mults = 0
        product_ots = 0
        for m, reveal_bits, low in passes:
            r1, r2, p, rm = _reveal(m, reveal_bits, bits, prim, kappa)
            product = low == reveal_bits  # a truncation pass needs no product, so no exponentiation
            exp_bits = reveal_bits + kappa + 2 if product else 0  # E(-e)^M
            encryptions = 2  # E(-e), E(e d) or E(alpha - delta), E(delta)
            if comparison == "ot" and product and product_width(reveal_bits, kappa):
                product_ots += m * exp_bits  # e M by one OT per mask bit instead (millionaire.product_answer)
                exp_bits, encryptions = 0, 1  # E(e d + R)
            s1 += r1 + m * (COMBINE_MULTS * mm + exp_bits * prim["exp_per_bit_nsq"])
            s2 += r2 + m * encryptions * 2 * mm
            packs, reveal_mults = packs + p, reveal_mults + rm
        replies = sum(2 * m for m, _, _ in passes)
        if comparison == "ot":  # per pass: rot_count random OTs (extension at both ends), their AND gates

            compared_bits = sum(m * low for m, _, low in passes)
            circuit = sum(rot_count(m, low) for m, _, low in passes)
            gates = (circuit - compared_bits) // 2
            rots = circuit + product_ots
            s1 += rots * prim["ot_s1"] + gates * prim["and_gate"] / 2
            s2 += rots * prim["ot_s2"] + gates * prim["and_gate"] / 2
            replies -= sum(m for m, rb, low in passes if low == rb and product_width(rb, kappa))
            to_s2 = packs * ct_bytes + rots * 16 + (compared_bits + 2 * gates + product_ots + 7) // 8
            to_s1 = replies * ct_bytes + (2 * compared_bits + 2 * gates + 7) // 8 + 32 * product_ots
            blind_exps = 0.0
        else:
            blind_exps = sum(m * blinded_positions(low) for m, _, low in passes)
            s1 += blind_exps * prim["dgk_blind_exp"] + compared_bits * BIT_MULTS * mmd
            s2 += compared_bits * (mmd + prim["dgk_zero_test"])
            to_s2 = packs * ct_bytes + compared_bits * dgk_bytes
            to_s1 = compared_bits * dgk_bytes + replies * ct_bytes
        elements = math.prod(shapes[entry["output"]])
        l = tensor_bits(spec, entry["input"])
        detail = {"comparisons": sum(m for m, _, _ in passes), "bits": l, "compared_bits": compared_bits,
                  "packs": packs, "shift": min(int(entry.get("shift", 0)), l)}
        dgk = comparison != "ot"
        counts = {"decryptions": packs, "paillier_encryptions": replies,
                  "dgk_encryptions": compared_bits * dgk, "dgk_zero_tests": compared_bits * dgk,
                  "dgk_blind_exps": round(blind_exps),
                  "mulmod_nsq": reveal_mults + sum((COMBINE_MULTS + 8) * m for m, _, _ in passes),
                  "mulmod_dgk": (1 + BIT_MULTS) * compared_bits * dgk,
                  "random_ots": rots if not dgk else 0,
                  "exp_bits_online": {k: v for m, rb, low in passes if low == rb
                                      and not (not dgk and product_width(rb, kappa))
                                      for k, v in ((rb + kappa + 2, m),)}}
    elif layer.kind == "to_user":
        n = int(spec["num_classes"])
        l = tensor_bits(spec, spec["output"])
        r1, r2, packs, reveal_mults = _reveal(n, l, bits, prim, kappa)
        s1 = r1 + n * 2 * user_mulmod
        s2 = r2 + n * 2 * user_mulmod
        to_s2, to_s1 = packs * ct_bytes, n * user_ct_bytes
        elements = n
        detail = {"values": n, "bits": l, "packs": packs}
        counts = {"decryptions": packs, "user_encryptions": n, "mulmod_nsq": reveal_mults}
    work = s1 + s2
    return {"s1_work": s1, "s2_work": s2, "work": work, "bound": work / max(1, cores),
            "min_bytes_to_s2": to_s2, "min_bytes_to_s1": to_s1, "elements": elements, "counts": counts, **detail}


def link_seconds(rounds: int, total_bytes: int, rtt: float = 1e-3, bandwidth_bits: float = 1e9) -> float:
    """Latency a link adds: one round trip per round plus serialisation of every byte."""
    return rounds * rtt + total_bytes * 8 / bandwidth_bits


#: the engine's online seconds over the protocol's bound, measured by ``bench/bench.py`` on the ICNN at
#: 2048 bits, 2 cores, OT comparison (docs/benchmarks.md: 3.34 s against a 2.4 s bound)
ENGINE_FACTOR = 1.4
#: one S1 -> S2 round trip on the link the prediction assumes (the same host or one data centre)
ROUND_TRIP = 1e-3


def layer_rounds(layer: Layer, in_shapes: list[tuple[int, ...]], cost: Cost, comparison: str) -> int:
    """Round trips S1 makes for one layer: two for a packed linear product (reveal, cross terms); per
    comparison pass the comparison's requests (OT: 1 + ceil(levels / 2); DGK: two), where a max-pool
    runs ceil(log2 k) passes one after another along each axis."""
    if cost.linear is not None:
        return 2
    if not cost.passes:
        return 0

    def per_pass(bits: int) -> int:
        return requests_needed(max(1, bits)) if comparison == "ot" else 2

    rounds = sum(per_pass(low) for _, _, low in cost.passes[:-1])  # a truncation first, if any
    m, revealed, low = cost.passes[-1]
    kernel = getattr(layer, "kernel", None)
    sequential = sum(max(0, k - 1).bit_length() for k in pair(kernel)) if layer.kind == "maxpool" else 1
    return rounds + sequential * per_pass(low)


def predict_query(spec: dict, prims: dict[str, float], bits: int, cores: int, comparison: str = "ot",
                  factor: float = ENGINE_FACTOR, rtt: float = ROUND_TRIP) -> dict[str, Any]:
    """The predicted online seconds of one query of the model whose public spec is ``spec``, with a
    ``bits``-bit key on ``cores`` cores, and the counts behind it, per interactive layer and in total:
    compared bits, multiply-accumulates, values revealed, rounds, least bytes, bound seconds."""
    ct_bytes = 2 * ((bits + 7) // 8)
    rows = []
    for entry in spec["layers"]:
        layer = layer_from_spec(entry)
        if not layer.interactive:
            continue
        in_shapes = [tuple(spec["shapes"][t]) for t in layer.sources()]
        cost = layer.cost(in_shapes, [tensor_bits(spec, t) for t in layer.sources()])
        bound = layer_bound(entry, spec, layer, bits, prims, cores, ct_bytes, 0, ct_bytes, prims["mulmod_nsq"],
                            comparison=comparison)
        rounds = layer_rounds(layer, in_shapes, cost, comparison)
        total_bytes = bound["min_bytes_to_s2"] + bound["min_bytes_to_s1"]
        rows.append({"name": layer.name, "kind": layer.kind, "rounds": rounds, "bytes": total_bytes,
                     "compared_bits": bound.get("compared_bits", 0), "macs": bound.get("macs", 0),
                     "revealed": bound.get("inputs", 0) + sum(m for m, _, _ in cost.passes),
                     "bound_seconds": bound["bound"],
                     "predicted_seconds": bound["bound"] * factor + link_seconds(rounds, total_bytes, rtt)})
    totals = {key: sum(r[key] for r in rows) for key in
              ("rounds", "bytes", "compared_bits", "macs", "revealed", "bound_seconds", "predicted_seconds")}
    return {"bits": bits, "cores": cores, "comparison": comparison, "factor": factor, "layers": rows, **totals}


def predict_for_machine(spec: dict, bits: int = 2048, cores: int | None = None, min_seconds: float = 0.05
                        ) -> dict[str, Any]:
    """:func:`predict_query` with the primitives timed now, on this machine, for a fresh ``bits``-bit key
    (a second or two; the OT comparison, the service's default)."""
    import os

    keys = generate_keypair(bits)
    prims = measure_primitives(keys.public, keys.private, min_seconds=min_seconds)
    return predict_query(spec, prims, bits, cores or os.cpu_count() or 1)
