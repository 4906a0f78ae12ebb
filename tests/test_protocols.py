"""Every secure function against its plaintext reference, 1024-bit keys, in-process channel."""
import random

import numpy as np
import pytest
from gmpy2 import mpz

from he_cnn.errors import BoundExceeded, ProtocolError, ShapeError
from he_cnn.geometry import im2col_indices, maxpool_comparisons, pool_windows
from he_cnn.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from he_cnn.protocols import comparison, linear, millionaire, output, smp
from he_cnn.protocols.common import slot_bits, slots_per_pack
from he_cnn.crypto.tensor import EncryptedTensor

rnd = random.Random(7)


def ints(n, lo, hi, shape=None):
    a = np.array([rnd.randint(lo, hi) for _ in range(n)], dtype=object)
    return a.reshape(shape) if shape else a


def enc(s1, values):
    return EncryptedTensor.encrypt(s1.public_key, values)


def rounds(s1):
    """Requests S1 sent so far, not counting the OT link's one-time base OTs."""
    stats = s1.channel.stats
    return stats.rounds - (stats.steps["ot_base"].rounds if "ot_base" in stats.steps else 0)


def per_compare(s1, k):
    """Requests one batched comparison of k bits takes with S1's comparison protocol."""
    return 2 if s1.comparison == "dgk" else millionaire.requests_needed(k)


def compared_bits(s1, count, k):
    """The engine's count of compared bits for ``count`` comparisons of k bits (DGK encrypts k + 1)."""
    return s1.ops.get("dgk_bit", 0) if s1.comparison == "dgk" else s1.ops.get("ot_bit", 0), \
        count * (k + 1 if s1.comparison == "dgk" else k)


def test_smp_matches_reference_and_costs_one_round(s1, keys1024):
    a, b = ints(40, -2**15, 2**15), ints(40, -2**15, 2**15)
    a[:3], b[:3] = [0, 2**15, -(2**15)], [5, 2**15, 2**15]
    out = smp.secure_multiply(s1, enc(s1, a), enc(s1, b), 16, 16)
    assert list(out.decrypt(keys1024.private)) == list(a * b)
    st = s1.channel.stats
    assert st.rounds == 1 and st.steps["smp"].rounds == 1
    packs = 2 * -(-40 // slots_per_pack(1024, slot_bits(16, 40)))
    ct = keys1024.public.ciphertext_bytes
    # what crossed: the packed reveals up (plus a small header), one ciphertext per product down
    assert packs * ct < st.bytes_to_s2 < packs * ct + 1024
    assert 40 * ct < st.bytes_to_s1 < 40 * ct + 1024


def conv_reference(x, w, b, stride, padding):
    c_out = w.shape[0]
    idx = im2col_indices(x.shape, w.shape[2], stride, padding)
    flat = np.array(list(x.reshape(-1)) + [0], dtype=object)
    cols = flat[np.where(idx < 0, x.size, idx)]
    y = cols.dot(w.reshape(c_out, -1).T) + b
    oh = int(np.sqrt(idx.shape[0])) if x.shape[1] == x.shape[2] else None
    return y.T.reshape(c_out, oh, -1)


@pytest.mark.parametrize("shape, c_out, k, stride, padding", [
    ((1, 6, 6), 2, 3, 1, 1),
    ((3, 5, 5), 4, 3, 2, 0),
    ((2, 7, 7), 3, 5, 2, 2),
    ((4, 4, 4), 2, 1, 1, 0),
])
def test_scvl_matches_reference(s1, keys1024, shape, c_out, k, stride, padding):
    x = ints(int(np.prod(shape)), -300, 300, shape)
    w = ints(c_out * shape[0] * k * k, -31, 31, (c_out, shape[0], k, k))
    b = ints(c_out, -10**6, 10**6)
    layer = linear.EncryptedLinear("conv", linear.LinearGeometry(shape, k, stride, padding),
                                   enc(s1, np.ascontiguousarray(w.reshape(c_out, -1).T)), enc(s1, b), 5)
    sid = linear.new_setup_id()
    setup = linear.setup_linear_layers(s1, sid, [layer])
    rounds_after_setup = s1.channel.stats.rounds
    out = linear.secure_linear(s1, sid, layer, setup["conv"], enc(s1, x), 9)
    assert out.shape == layer.out_shape
    assert (out.decrypt(keys1024.private) == conv_reference(x, w, b, stride, padding)).all()
    assert rounds_after_setup == 1 and s1.channel.stats.rounds == 3


def test_sct_matches_reference(s1, keys1024):
    x = ints(30, -2**20, 2**20)
    w = ints(30 * 5, -100, 100, (5, 30))
    b = ints(5, -2**30, 2**30)
    layer = linear.EncryptedLinear("fc", linear.LinearGeometry((30,)), enc(s1, np.ascontiguousarray(w.T)),
                                   enc(s1, b), 7)
    sid = linear.new_setup_id()
    setup = linear.setup_linear_layers(s1, sid, [layer])
    out = linear.secure_linear(s1, sid, layer, setup["fc"], enc(s1, x), 21)
    assert list(out.decrypt(keys1024.private)) == list(w.dot(x) + b)


def test_linear_rejects_wrong_input_shape(s1):
    layer = linear.EncryptedLinear("fc", linear.LinearGeometry((4,)), enc(s1, ints(8, -3, 3, (4, 2))),
                                   enc(s1, ints(2, 0, 1)), 2)
    with pytest.raises(ShapeError, match=r"input shape \(5,\), expected \(4,\)"):
        linear.secure_linear(s1, "x", layer, None, enc(s1, ints(5, 0, 1)), 2)
    with pytest.raises(ShapeError, match="expected"):
        linear.EncryptedLinear("fc", linear.LinearGeometry((4,)), enc(s1, ints(6, 0, 1, (3, 2))),
                               enc(s1, ints(2, 0, 1)), 2)


def test_sibling_layers_share_one_reveal_of_their_input(s1, keys1024, key_cloud):
    """Three layers on one input (1x1, 3x3 and 5x5 convolutions, an Inception block's
    siblings) with the same input masks: the first reveals X + A, the others send S2's ticket. Every
    output is exact, S2 decrypts X + A once, and the ticket serves exactly the announced siblings."""
    shape = (3, 5, 5)
    x = ints(75, -300, 300, shape)
    layers, weights = [], []
    for name, k in (("b1", 1), ("b2", 3), ("b3", 5)):
        w = ints(2 * 3 * k * k, -31, 31, (2, 3, k, k))
        b = ints(2, -10**6, 10**6)
        weights.append((w, b, k))
        layers.append(linear.EncryptedLinear(name, linear.LinearGeometry(shape, k, 1, k // 2),
                                             enc(s1, np.ascontiguousarray(w.reshape(2, -1).T)), enc(s1, b), 5))
    sid = linear.new_setup_id()
    setups = linear.setup_linear_layers(s1, sid, layers)
    ex = enc(s1, x)
    first = linear.precompute_linear(s1, layers[0], setups["b1"], 9)
    pres = [first] + [linear.precompute_linear(s1, layer, setups[layer.name], 9, first.masks) for layer in layers[1:]]
    shared = linear.SharedInput(uses=2)
    key_cloud.observations.clear()
    for layer, pre, (w, b, k) in zip(layers, pres, weights):
        out = linear.secure_linear(s1, sid, layer, setups[layer.name], ex, 9, pre, shared)
        assert (out.decrypt(keys1024.private) == conv_reference(x, w, b, 1, k // 2)).all()
    assert [o.step for o in key_cloud.observations] == ["x", "z", "z", "z"]
    assert s1.channel.stats.rounds == 1 + 3 * 2
    # the ticket was issued for two siblings: a third use is refused
    with pytest.raises(ProtocolError, match="unknown or expired"):
        linear.secure_linear(s1, sid, layers[1], setups["b2"], ex, 9, pres[1], shared)
    # a sibling without the first sibling's masks would compute garbage: refused at S1
    with pytest.raises(ProtocolError, match="sibling's masks"):
        linear.secure_linear(s1, sid, layers[1], setups["b2"], ex, 9, None, linear.SharedInput(1, "t"))
    # S2 keeps an input for a bounded number of siblings
    with pytest.raises(ProtocolError, match="at most 16 sibling layers"):
        linear.secure_linear(s1, sid, layers[0], setups["b1"], ex, 9, first, linear.SharedInput(17))


def test_ticket_store_counts_uses_and_keeps_kinds_apart():
    from he_cnn.parties.key_cloud import TicketStore

    store = TicketStore()
    t = store.put("linear_input", "v", uses=2)
    with pytest.raises(ProtocolError, match="belongs to a linear_input step"):
        store.pop(t, "linear")
    assert store.pop(t, "linear_input") == "v" and store.pop(t, "linear_input") == "v"
    with pytest.raises(ProtocolError, match="unknown or expired"):
        store.pop(t, "linear_input")
    assert len(store) == 0


def edge_values(bits):
    top = 2**bits - 1
    h = top // 2
    return np.array([0, 0, 1, -1, top, -top, h, h, -h] + [rnd.randint(-top, top) for _ in range(25)], dtype=object)


@pytest.mark.parametrize("bits", [1, 8, 30])
def test_compare_and_relu_match_reference(s1, keys1024, bits):
    x = edge_values(bits)
    t = comparison.secure_sign(s1, enc(s1, x), bits, product=False)
    assert list(t.decrypt(keys1024.private)) == [int(v >= 0) for v in x]
    xt = comparison.secure_sign(s1, enc(s1, x), bits, product=True)
    assert list(xt.decrypt(keys1024.private)) == [max(v, 0) for v in x]
    assert rounds(s1) == 2 * per_compare(s1, bits)


@pytest.mark.parametrize("bits, shift", [(8, 1), (8, 3), (12, 11), (30, 13)])
def test_truncation_is_an_exact_floor_division(s1, keys1024, bits, shift):
    x = np.concatenate([edge_values(bits), np.array([-(2**bits), -(2**shift), -(2**shift) - 1, -(2**shift) + 1,
                                                      2**shift, 2**shift - 1, -1], dtype=object)])
    out = comparison.secure_truncate(s1, enc(s1, x), bits, shift)
    assert list(out.decrypt(keys1024.private)) == [int(v) >> shift for v in x]  # floor, also for negatives
    assert rounds(s1) == per_compare(s1, shift)
    counted, expected = compared_bits(s1, x.size, shift)  # only the low bits are compared
    assert counted == expected


@pytest.mark.parametrize("bits, shift", [(8, 3), (20, 13), (5, 5), (5, 9)])
def test_requantising_relu_matches_the_reference(s1, keys1024, bits, shift):
    x = np.concatenate([edge_values(bits), np.array([-(2**bits), 2**shift, 2**shift - 1], dtype=object)])
    x = np.array([v for v in x if -(2**bits) <= v < 2**bits], dtype=object)  # the declared range
    out = comparison.secure_relu(s1, enc(s1, x), bits, shift)
    assert list(out.decrypt(keys1024.private)) == [max(int(v), 0) >> shift for v in x]
    assert rounds(s1) == (0 if shift >= bits else per_compare(s1, shift) + per_compare(s1, bits - shift))


def test_relu_of_a_tensor_bounded_by_zero(s1, keys1024):
    """A zero bound (all-zero weights, say) still compares one bit."""
    x = np.zeros(4, dtype=object)
    assert list(comparison.secure_relu(s1, enc(s1, x), 0).decrypt(keys1024.private)) == [0, 0, 0, 0]
    assert list(comparison.secure_maxpool(s1, enc(s1, x.reshape(1, 2, 2)), 2, 1, 0, 0).decrypt(
        keys1024.private).reshape(-1)) == [0]


def test_compare_only(s1, keys1024):
    x = edge_values(12).reshape(2, -1)
    t = comparison.secure_compare(s1, enc(s1, x), 12)
    assert t.shape == x.shape and (t.decrypt(keys1024.private) == (x >= 0).astype(int)).all()


@pytest.mark.parametrize("shape, k, stride, padding, levels", [
    ((2, 4, 4), 2, 2, 0, 2),
    ((1, 5, 5), 3, 2, 1, 4),
    ((2, 4, 4), 3, 1, 1, 4),
    ((1, 6, 5), 3, 2, 0, 4),
    ((1, 2, 2), 3, 1, 1, 2),  # every window is the whole 2x2 input: one level per axis
])
def test_smap_matches_reference_with_ties(s1, keys1024, shape, k, stride, padding, levels):
    x = ints(int(np.prod(shape)), -50, 50, shape)
    x.reshape(-1)[:6] = 7  # ties inside windows
    out = comparison.secure_maxpool(s1, enc(s1, x), k, stride, padding, 6)  # |x| <= 50 < 2^6
    ref = [max(x.reshape(-1)[i] for i in w) for w in pool_windows(shape, k, stride, padding)]
    assert list(out.decrypt(keys1024.private).reshape(-1)) == ref
    # separable sparse-table pooling: two levels per axis for 3-wide windows, one for 2-wide; each one
    # batched comparison of the 7-bit differences
    assert rounds(s1) == levels * per_compare(s1, 7)
    counted, expected = compared_bits(s1, maxpool_comparisons(shape, k, stride, padding), 7)  # what quantize plans with
    assert counted == expected


@pytest.mark.parametrize("shift", [3, 9])
def test_smap_with_a_requantising_shift(s1, keys1024, shift):
    shape = (2, 4, 4)
    x = ints(32, -2**8, 2**8 - 1, shape)
    out = comparison.secure_maxpool(s1, enc(s1, x), 3, 2, 1, 8, shift)
    ref = [max(x.reshape(-1)[i] for i in w) >> shift for w in pool_windows(shape, 3, 2, 1)]
    assert list(out.decrypt(keys1024.private).reshape(-1)) == ref
    low = min(shift, 8)  # then 4 levels of maxima on the 8 - low remaining bits (differences: one more)
    assert rounds(s1) == per_compare(s1, low) + 4 * per_compare(s1, 8 - low + 1)


def test_value_outside_declared_bound_is_a_typed_error(s1):
    with pytest.raises(BoundExceeded, match="bound"):
        comparison.secure_relu(s1, enc(s1, np.array([2**50, 3], dtype=object)), 8)
    with pytest.raises(BoundExceeded):
        comparison.secure_relu(s1, enc(s1, np.array([-(2**60)], dtype=object)), 8)


def test_result_reaches_only_the_user(s1, keys1024, user_keys):
    y = ints(10, -2**40, 2**40)
    out = output.reencrypt_for_user(s1, enc(s1, y), 41, user_keys.public)
    assert out.public_key == user_keys.public
    assert list(out.decrypt(user_keys.private)) == list(y)
    # the cloud key cannot open it: decrypting with the cloud's primes gives unrelated numbers
    assert all(keys1024.public.decode(keys1024.private.decrypt_raw(c % keys1024.public.nsq)) != v
               for c, v in zip(out.data, y))


def test_s2_keeps_only_user_keys_it_accepts(s1, key_cloud, user_keys):
    """A refused user key (too small, too large, the cloud's own) is not kept, so no table is built for it."""
    y = enc(s1, ints(3, -2**20, 2**20))
    for bad in (generate_keypair(512, allow_small=True).public, PublicKey(mpz(2) ** 8200 + 1), key_cloud.keys.public):
        with pytest.raises(ProtocolError, match="unacceptable user key"):
            output.reencrypt_for_user(s1, y, 21, bad, min_user_bits=0)
        assert int(bad.n) not in key_cloud.user_keys._keys
    output.reencrypt_for_user(s1, y, 21, user_keys.public)
    assert int(user_keys.public.n) in key_cloud.user_keys._keys

def test_s1_context_holds_no_secret_key(s1):
    for value in vars(s1).values():
        assert not isinstance(value, PrivateKey)
    assert not hasattr(s1.dgk_key, "p") and not hasattr(s1.dgk_key, "v_p")


def test_unknown_step_and_bad_payload_are_typed(key_cloud):
    from he_cnn.errors import BadRequest, WireFormatError

    with pytest.raises(BadRequest, match="unknown protocol step"):
        key_cloud.handle("nope", b"")
    with pytest.raises(WireFormatError):
        key_cloud.handle("smp", b"garbage")


def exercise_protocols(ctx, private) -> None:
    """A ReLU (a comparison, S2's decryptions and zero tests) and a convolution (set-up and query rounds)
    through ``ctx``, each checked against its plaintext reference (also used by tests/test_ray.py)."""
    x = edge_values(20)
    assert list(comparison.secure_relu(ctx, enc(ctx, x), 20).decrypt(private)) == [max(v, 0) for v in x]
    shape = (2, 5, 5)
    xi = ints(50, -300, 300, shape)
    w = ints(3 * 2 * 9, -31, 31, (3, 2, 3, 3))
    b = ints(3, -1000, 1000)
    layer = linear.EncryptedLinear("c", linear.LinearGeometry(shape, 3, 1, 1),
                                   enc(ctx, np.ascontiguousarray(w.reshape(3, -1).T)), enc(ctx, b), 5)
    setup = linear.setup_linear_layers(ctx, "par", [layer])
    out = linear.secure_linear(ctx, "par", layer, setup["c"], enc(ctx, xi), 9)
    assert (out.decrypt(private) == conv_reference(xi, w, b, 1, 1)).all()


def test_protocols_exact_with_process_workers(keys1024, key_cloud):
    """The same results when S1 and S2 spread their loops over a process pool."""
    from he_cnn.transport.channel import InProcessChannel
    from he_cnn.parallel import Workers
    from he_cnn.protocols.common import S1Context

    workers = Workers(2)
    key_cloud.workers = workers
    try:
        for comparison_name in ("ot", "dgk"):
            ctx = S1Context(keys1024.public, key_cloud.dgk_public, InProcessChannel(key_cloud.handle),
                            workers=workers, comparison=comparison_name)
            exercise_protocols(ctx, keys1024.private)
    finally:
        key_cloud.workers = Workers(1)
        workers.shutdown()


def test_a_dead_worker_fails_the_request_cleanly_and_the_pool_restarts(keys1024, key_cloud):
    """A worker process killed mid-request: that request ends with WorkersUnavailable (503 at a service),
    never a partial result, and the next one runs exactly on a fresh pool."""
    import os
    import signal

    from he_cnn.errors import WorkersUnavailable
    from he_cnn.parallel import Workers

    workers = Workers(2)
    try:
        pids = workers.map(_pid_after, [(0.0,), (0.0,)])
        with pytest.raises(WorkersUnavailable, match="worker process died"):
            workers.map(_kill_self_or_wait, [(signal.SIGKILL,), (None,)])
        assert workers.map(pow, [(2, 3), (3, 2)]) == [8, 9]
        assert not set(workers.map(_pid_after, [(0.0,), (0.0,)])) & set(pids) or os.name != "posix"
    finally:
        workers.shutdown()


def _pid_after(seconds: float) -> int:
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def _kill_self_or_wait(sig) -> int:
    import os
    import time

    if sig is not None:
        os.kill(os.getpid(), sig)
    time.sleep(0.5)
    return 0


def test_chunks_are_sized_by_cost():
    """Cheap items are grouped until a chunk holds min_task_seconds of work; dear ones spread over every
    worker (and over twice as many chunks where the backend asks for it)."""
    from he_cnn.parallel import Workers

    workers = Workers(4)
    assert len(workers.chunks(1000)) == 4
    assert len(workers.chunks(1000, item_seconds=1e-6)) == 1  # 1 ms of work in all: not worth a hop
    assert len(workers.chunks(1000, item_seconds=1e-5)) == 4
    workers.chunks_per_worker = 2
    chunks = workers.chunks(1000, item_seconds=1e-3)
    assert len(chunks) == 8 and [i for r in chunks for i in r] == list(range(1000))


def test_dgk_ciphertexts_are_range_checked_in_the_workers(keys1024, key_cloud, monkeypatch):
    """The comparison's DGK arrays reach the process pool as bytes, unchecked (wire.Message.payload):
    the workers check 0 < c < n, and their ProtocolError arrives as such at both clouds."""
    from he_cnn.parties import key_cloud as s2_mod
    from he_cnn.transport.channel import InProcessChannel
    from he_cnn.parallel import Workers
    from he_cnn.protocols.common import S1Context

    workers = Workers(2)
    key_cloud.workers = workers
    n_dgk = int(key_cloud.dgk_public.n)
    width = key_cloud.dgk_public.ciphertext_bytes
    try:
        ctx = S1Context(keys1024.public, key_cloud.dgk_public, InProcessChannel(key_cloud.handle), workers=workers,
                        comparison="dgk")
        values = edge_values(20)
        x = enc(ctx, values)
        real_bits = comparison.s2_compare_bits

        def bad_bits(cloud, msg):  # S2 (hostile) puts n itself among the bits
            reply = real_bits(cloud, msg)
            blob, shape = reply.blobs["bits"]
            reply.set_blob("bits", blob[:-width] + n_dgk.to_bytes(width, "big"), width, shape)
            return reply

        monkeypatch.setitem(s2_mod.HANDLERS, comparison.BITS_STEP, bad_bits)
        with pytest.raises(ProtocolError, match="S2's bit DGK ciphertext out of range"):
            comparison.secure_relu(ctx, x, 20)
        monkeypatch.setitem(s2_mod.HANDLERS, comparison.BITS_STEP, real_bits)
        real_blind = comparison._blind_chunk
        monkeypatch.setattr(comparison, "_blind_chunk", _zero_first)  # S1 (hostile) sends a 0
        with pytest.raises(ProtocolError, match="blinded DGK ciphertext out of range"):
            comparison.secure_relu(ctx, x, 20)
        monkeypatch.setattr(comparison, "_blind_chunk", real_blind)
        assert list(comparison.secure_relu(ctx, x, 20).decrypt(keys1024.private)) == [max(v, 0) for v in values]
    finally:
        key_cloud.workers = Workers(1)
        workers.shutdown()


def _zero_first(dgk: dict, *args) -> bytes:
    """_blind_chunk with its first ciphertext replaced by 0 (top level: the workers unpickle it by name)."""
    out = _real_blind_chunk(dgk, *args)
    width = (int(dgk["n"]).bit_length() + 7) // 8
    return bytes(width) + out[width:]


_real_blind_chunk = comparison._blind_chunk


def test_workers_refuse_work_after_shutdown():
    """A thread that outlives a service's shutdown cannot start a new pool (it would race the
    interpreter's exit); work that needs no pool still runs inline."""
    from he_cnn.parallel import Workers

    workers = Workers(2)
    assert workers.map(pow, [(2, 3), (3, 2)]) == [8, 9]
    workers.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        workers.map(pow, [(2, 3), (3, 2)])
    assert workers.map(pow, [(2, 5)]) == [32]


def test_workers_die_with_their_parent(tmp_path):
    """A cloud killed with SIGKILL must not leave its worker processes behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from he_cnn.parallel import Workers\n"
        "import os, sys, time\n"
        "w = Workers(2)\n"
        "pids = w.map(os.getpid, [()] * 8)\n"
        "print(' '.join(map(str, sorted(set(pids)))), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and proc.pid not in pids
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive
