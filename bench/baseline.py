"""The straightforward baseline: our protocols written per element on ``phe.EncryptedNumber`` objects.

Same protocol, none of the engineering: no packing (one ciphertext per revealed value), no offline
phase (every randomizer is a fresh full ``r^N`` from phe's ``encrypt``/``obfuscate``; DGK
randomizers are fresh ``h^r``), no shared-base or Straus exponentiation (one phe scalar
multiplication per term), phe's own CRT decryption, one core, per-element Python loops.

* :func:`baseline_linear` — SCVL for one convolution with the model-time weight mask B (set-up once,
  not timed, as in ours): S1 masks each input (E(x) + A, obfuscated), S2 decrypts each, computes
  Xt_cols @ Kt and encrypts each output, S1 removes the cross terms per MAC
  (E(Y) - sum E(x_f) B_fc - sum A_f E(Kt_fc) + E(b_c)).
* :func:`baseline_relu` — SACT per element with the DGK/Veugen comparison of
  :mod:`he_cnn.protocols.comparison` (same formulas, same product folding).

Both run on a *subset* (a block of output positions, or some elements), check every result against
the plaintext integer reference, and extrapolate per unit (per input revealed, per MAC, per output,
per element) to the full layer — the report says so.
"""
from __future__ import annotations

import math
import secrets
import time
from typing import Any

import gmpy2
import numpy as np
import phe
from gmpy2 import mpz

from he_cnn.geometry import conv_output_hw, im2col_indices
from he_cnn.crypto.paillier import KAPPA
from he_cnn.compiler.cost import tensor_bits


def _phe_keys(keys) -> tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey]:
    pub = phe.PaillierPublicKey(int(keys.public.n))
    return pub, phe.PaillierPrivateKey(pub, int(keys.private.p), int(keys.private.q))


def _mask(l: int) -> int:
    return (1 << l) + secrets.randbits(l + 1 + KAPPA)


def _wrap(pub: phe.PaillierPublicKey, c: Any) -> phe.EncryptedNumber:
    return phe.EncryptedNumber(pub, int(c), 0)


def baseline_linear(keys, model, enc_model, layer_name: str, image_ct, reference: dict, block: int = 2
                    ) -> dict[str, Any]:
    """phe SCVL on a block x block square of output positions (all channels) of ``layer_name``."""
    pub, priv = _phe_keys(keys)
    entry = next(e for e in enc_model.spec["layers"] if e["name"] == layer_name)
    lin = enc_model.linear[layer_name]
    in_shape = tuple(enc_model.spec["shapes"][entry["input"]])
    k, stride, pad = int(entry["kernel"]), int(entry["stride"]), int(entry["padding"])
    oh, ow = conv_output_hw(in_shape[1], in_shape[2], k, stride, pad)
    idx = im2col_indices(in_shape, k, stride, pad)  # (P, F)
    positions, fan_in = idx.shape
    channels = lin.weight.shape[1]
    lx = tensor_bits(enc_model.spec, entry["input"])
    lw = int(entry["weight_bits"])
    if entry["input"] != enc_model.spec["input_name"]:
        raise ValueError("the linear baseline runs on a layer fed by the image")
    x_ct = [_wrap(pub, c) for c in image_ct.data.reshape(-1)]

    # model set-up (once per model, not per query, same as ours; not timed): E(Kt) = E(K) + B, S2 keeps Kt
    ek = [[_wrap(pub, lin.weight.data[f, c]) for c in range(channels)] for f in range(fan_in)]
    b_mask = [[_mask(lw) for _ in range(channels)] for _ in range(fan_in)]
    ekt = [[ek[f][c] + b_mask[f][c] for c in range(channels)] for f in range(fan_in)]
    kt = [[priv.decrypt(ekt[f][c]) for c in range(channels)] for f in range(fan_in)]
    ebias = [_wrap(pub, lin.bias.data[c]) for c in range(channels)]

    # a block of output positions near the centre (full receptive fields: the most MACs per output)
    r0, c0 = max(0, oh // 2 - block // 2), max(0, ow // 2 - block // 2)
    pos = [r * ow + c for r in range(r0, min(oh, r0 + block)) for c in range(c0, min(ow, c0 + block))]
    inputs = sorted({int(i) for p in pos for i in idx[p] if i >= 0})

    # online, per element
    a_mask = {i: _mask(lx) for i in inputs}
    t0 = time.perf_counter()
    sent = {}
    for i in inputs:  # S1: E(x + A), fresh randomness
        e = x_ct[i] + a_mask[i]
        e.obfuscate()
        sent[i] = e
    t1 = time.perf_counter()
    xt = {i: priv.decrypt(sent[i]) for i in inputs}  # S2
    t2 = time.perf_counter()
    ey = {}
    for p in pos:  # S2: Y = Xt_cols @ Kt in the clear, one fresh encryption per output
        for c in range(channels):
            y = sum(xt[int(i)] * kt[f][c] for f, i in enumerate(idx[p]) if i >= 0)
            ey[p, c] = pub.encrypt(y)
    t3 = time.perf_counter()
    out = {}
    macs = 0
    for p in pos:  # S1: remove the cross terms per MAC, add the bias
        for c in range(channels):
            cross = None
            for f, i in enumerate(idx[p]):
                if i < 0:
                    continue
                term = x_ct[int(i)] * b_mask[f][c] + ekt[f][c] * a_mask[int(i)]
                cross = term if cross is None else cross + term
                macs += 1
            out[p, c] = ey[p, c] - cross + ebias[c]
    t4 = time.perf_counter()

    ref = reference[layer_name]  # (C, OH, OW)
    exact = all(priv.decrypt(out[p, c]) == int(ref[c, p // ow, p % ow]) for p in pos for c in range(channels))
    per_input = (t2 - t0) / len(inputs)
    per_output = (t3 - t2) / len(ey)
    per_mac = (t4 - t3) / macs
    full_inputs = math.prod(in_shape)
    full_macs = int((idx >= 0).sum()) * channels
    full_outputs = positions * channels
    extrapolated = full_inputs * per_input + full_outputs * per_output + full_macs * per_mac
    # the patent's SMP applied to every product separately (both operands revealed per MAC, one
    # encryption per MAC), priced with the same measured unit costs: an estimate, not a run
    smp_per_mac = full_macs * (2 * per_input + per_output + per_mac)
    return {
        "layer": layer_name, "method": f"subset of {len(pos)} output positions x {channels} channels, extrapolated",
        "subset_inputs": len(inputs), "subset_outputs": len(ey), "subset_macs": macs,
        "subset_seconds": t4 - t0, "exact": bool(exact),
        "per_input_reveal": per_input, "per_output_s2": per_output, "per_mac_s1": per_mac,
        "full_inputs": full_inputs, "full_outputs": full_outputs, "full_macs": full_macs,
        "seconds": extrapolated, "smp_per_mac_estimate": smp_per_mac,
        "parts": {"s1_mask": t1 - t0, "s2_decrypt": t2 - t1, "s2_encrypt": t3 - t2, "s1_cross": t4 - t3},
    }


def baseline_relu(keys, dgk_public, dgk_private, enc_model, layer_name: str, x_ct, reference: dict,
                  elements: int = 16) -> dict[str, Any]:
    """phe + DGK SACT for ``elements`` elements of ReLU layer ``layer_name``; x_ct is E(its input)."""
    pub, priv = _phe_keys(keys)
    entry = next(e for e in enc_model.spec["layers"] if e["name"] == layer_name)
    l = tensor_bits(enc_model.spec, entry["input"])
    flat = x_ct.data.reshape(-1)
    total = flat.size
    chosen = [int(i) for i in np.linspace(0, total - 1, min(elements, total)).round().astype(int)]
    nd, g, h, u = dgk_public.n, dgk_public.g, dgk_public.h, dgk_public.u
    rbits = (5 * dgk_public.t) // 2
    p, v_p = dgk_private.p, dgk_private.v_p
    width = l + 1
    timings = {"s1_mask": 0.0, "s2_decrypt_dgk": 0.0, "s1_blind": 0.0, "s2_zero_encrypt": 0.0, "s1_combine": 0.0}
    results = {}
    for i in chosen:
        ex = _wrap(pub, flat[i])
        t0 = time.perf_counter()
        m = _mask(l)  # S1: d = x + M, M = 2^l + r
        ed = ex + m
        ed.obfuscate()
        t1 = time.perf_counter()
        d = priv.decrypt(ed)  # S2: decrypt, DGK-encrypt the bits of beta' = 2 (d mod 2^l) + 1, fresh h^r
        beta = ((d & ((1 << l) - 1)) << 1) | 1
        bits = [(beta >> (l - j)) & 1 for j in range(width)]
        cts = [(g if b else 1) * gmpy2.powmod(h, secrets.randbits(rbits), nd) % nd for b in bits]
        t2 = time.perf_counter()
        rho2 = ((m - (1 << l)) & ((1 << l) - 1)) << 1  # S1: combine, blind, shuffle
        s = 1 if secrets.randbits(1) else -1
        xor_acc = mpz(1)
        row = []
        for j in range(width):
            rb = (rho2 >> (l - j)) & 1
            cb = cts[j]
            exp = 1 + secrets.randbelow(u - 1)
            if rb == (1 if s == 1 else 0):  # c_j can be zero here: compute and blind it
                c = gmpy2.powmod(g, s - rb, nd) * cb % nd
                c = c * gmpy2.powmod(xor_acc, 3, nd) % nd
                row.append(gmpy2.powmod(c, exp, nd) * gmpy2.powmod(h, secrets.randbits(rbits), nd) % nd)
            else:  # never zero: a fresh encryption of a uniform non-zero value
                row.append(gmpy2.powmod(g, exp, nd) * gmpy2.powmod(h, secrets.randbits(rbits), nd) % nd)
            xor_acc = xor_acc * (cb if rb == 0 else g * gmpy2.invert(cb, nd) % nd) % nd
        order = list(range(width))
        secrets.SystemRandom().shuffle(order)
        row = [row[k] for k in order]
        t3 = time.perf_counter()
        delta = int(sum(gmpy2.powmod(c, v_p, p) == 1 for c in row) > 0)  # S2: all zero tests, fresh encryptions
        e = (d >> l) & 1 ^ delta
        e_neg, e_d = pub.encrypt(-e), pub.encrypt(e * d)
        t4 = time.perf_counter()
        f = ((m >> l) - 1) & 1 ^ (s == -1)  # S1: t = e xor f; x t = e d - e M (f = 0) or x - e d + e M
        w = e_d + e_neg * m
        results[i] = ex - w if f else w
        t5 = time.perf_counter()
        for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            timings[key] += dt
    # the plain ReLU: a requantising layer (shift > 0) also truncates in ours, which the baseline leaves out
    ref = np.maximum(reference[entry["input"]].reshape(-1), 0)
    exact = all(priv.decrypt(results[i]) == int(ref[i]) for i in chosen)
    subset = sum(timings.values())
    per_element = subset / len(chosen)
    return {
        "layer": layer_name, "method": f"subset of {len(chosen)} of {total} elements, extrapolated",
        "bits": l, "shift": int(entry.get("shift", 0)), "subset_elements": len(chosen), "subset_seconds": subset,
        "exact": bool(exact),
        "per_element": per_element, "full_elements": total, "seconds": per_element * total, "parts": timings,
    }
