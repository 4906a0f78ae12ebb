"""Encrypted 1:N identification against its plaintext integer reference, 1024-bit keys, in-process."""
import random

import numpy as np
import pytest
from scipy import stats

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BoundExceeded, HECNNError, ProtocolError, ShapeError
from he_cnn.protocols import identify as idf
from he_cnn.wire import Message, decode, encode

rnd = random.Random(19)
F, LT, LX = 12, 5, 5
P_THRESHOLD = 1e-3


def templates(n, features=F, bits=LT):
    hi = (1 << bits) - 1
    return np.array([[rnd.randint(-hi, hi) for _ in range(features)] for _ in range(n)], dtype=object)


def gallery(s1, t, threshold, chunks=(None,), name=None):
    """An enrolled gallery of templates t, split at the indices in ``chunks``, set up with S2."""
    pk = s1.public_key
    g = idf.EncryptedGallery(name or f"g{rnd.getrandbits(64):x}", t.shape[1], LT, LX,
                             idf.encrypt_threshold(pk, threshold, LX, LT, t.shape[1]))
    bounds = [0] + [c for c in chunks if c] + [len(t)]
    for a, b in zip(bounds, bounds[1:]):
        g.chunks.append(idf.enrol_chunk(pk, t[a:b], LT, LX))
        idf.setup_gallery(s1, g, len(g.chunks) - 1)
    return g


def identify(s1, g, x, user):
    out = idf.secure_identify(s1, g, EncryptedTensor.encrypt(s1.public_key, x), idf.prepare_identify(s1, g)[0],
                              user.public)
    return idf.read_answer(out.decrypt(user.private)[0], g.count)


def verify(s1, g, x, j, user):
    out = idf.secure_verify(s1, g, EncryptedTensor.encrypt(s1.public_key, x), j, idf.prepare_identify(s1, g)[0],
                            user.public)
    answer = idf.read_answer(out.decrypt(user.private)[0], g.count)
    assert answer in (j, None)
    return answer == j


def near(t, i, noise=3):
    return [max(-31, min(31, int(v) + rnd.randint(-noise, noise))) for v in t[i]]


def test_identify_matches_the_reference_on_twelve_queries_per_protocol(s1, user_keys):
    t = templates(37)
    t[20] = t[4]  # two equal templates: their similarities tie for every query
    threshold = 400
    g = gallery(s1, t, threshold, chunks=(16, 29))  # three enrolments: two appends
    queries = [near(t, i) for i in (0, 4, 20, 36, 15, 16, 28, 29)]  # 4 and 20 tie: the smaller index wins
    queries += [[0] * F, [rnd.randint(-2, 2) for _ in range(F)]]  # no match
    queries += [[rnd.randint(-31, 31) for _ in range(F)] for _ in range(2)]
    answers = [identify(s1, g, x, user_keys) for x in queries]
    expected = [idf.identify_reference(t, x, threshold) for x in queries]
    assert answers == expected
    assert answers[1] == answers[2] == 4 and None in answers and len(queries) == 12


def test_the_threshold_is_inclusive_and_ties_go_to_the_smaller_index(s1, user_keys):
    t = templates(9)
    x = near(t, 5)
    sims = [int(v) for v in t.dot(np.array(x, dtype=object))]
    best = max(sims)
    assert identify(s1, gallery(s1, t, best), x, user_keys) == sims.index(best)
    assert identify(s1, gallery(s1, t, best + 1), x, user_keys) is None
    tied = np.concatenate([t[:2], t[5:6], t[2:]])  # the best template at index 2 and again at 6
    assert identify(s1, gallery(s1, tied, best), x, user_keys) == 2


def test_verify_answers_match_or_no_match_only(s1, user_keys):
    t = templates(30)
    threshold = 300
    g = gallery(s1, t, threshold, chunks=(11,))
    x = near(t, 13, noise=1)
    for j in (13, 0, 12, 29):
        assert verify(s1, g, x, j, user_keys) == idf.verify_reference(t, x, threshold, j)
    assert verify(s1, g, x, 13, user_keys)


def test_one_query_costs_its_rounds(s1, user_keys):
    t = templates(9)
    g = gallery(s1, t, 0)
    pre = idf.prepare_identify(s1, g)[0]
    before = s1.channel.stats.steps.copy()
    rounds = s1.channel.stats.rounds
    idf.secure_identify(s1, g, EncryptedTensor.encrypt(s1.public_key, [1] * F), pre, user_keys.public)
    steps = s1.channel.stats.steps
    assert steps["identify"].rounds == steps["identify_unpack"].rounds == 1 and steps["to_user"].rounds == 1
    assert "identify_prepare" in before and steps["identify_prepare"].rounds == before["identify_prepare"].rounds
    assert s1.channel.stats.rounds - rounds >= 3 + 4  # 10 leaves: 4 levels of comparisons
    assert s1.ops["exp_online"] >= F  # one group of k <= 10 templates


def test_misuse_is_refused(s1, user_keys, key_cloud):
    t = templates(5)
    g = gallery(s1, t, 0)
    pre = idf.prepare_identify(s1, g)[0]
    x = EncryptedTensor.encrypt(s1.public_key, [1] * F)
    idf.secure_identify(s1, g, x, pre, user_keys.public)
    with pytest.raises(ProtocolError, match="twice"):
        idf.secure_identify(s1, g, x, pre, user_keys.public)
    with pytest.raises(ShapeError):
        idf.secure_identify(s1, g, EncryptedTensor.encrypt(s1.public_key, [1] * (F + 1)), idf.prepare_identify(s1, g)[0],
                            user_keys.public)
    with pytest.raises(ShapeError):
        idf.secure_verify(s1, g, x, 5, idf.prepare_identify(s1, g)[0], user_keys.public)
    with pytest.raises(BoundExceeded):
        idf.enrol_chunk(s1.public_key, templates(2, bits=LT + 1) * 2, LT, LX)
    with pytest.raises(BoundExceeded):
        idf.encrypt_threshold(s1.public_key, 1 << 40, LX, LT, F)
    with pytest.raises(ProtocolError, match="continue"):  # an append must follow the chunks S2 holds
        idf.setup_gallery(s1, idf.EncryptedGallery(g.gallery_id, F, LT, LX, g.threshold, g.chunks * 3), 2)
    idf.setup_gallery(s1, g, 0)  # repeated (S1 crashed before publishing): replaces what S2 holds from there
    stranger = idf.EncryptedGallery("never-set-up", F, LT, LX, g.threshold, g.chunks)
    with pytest.raises(ProtocolError, match="unknown gallery"):
        idf.prepare_identify(s1, stranger)
    with pytest.raises(ProtocolError):
        idf.read_answer(0, 5)  # code 0 would be index 6


def test_the_mask_generator_is_deterministic_and_in_range():
    seed = bytes(range(16))
    a = idf.template_masks(seed, 50, 7, 5)
    assert np.array_equal(a, idf.template_masks(seed, 50, 7, 5))
    assert a.min() >= 1 << 5 and a.max() < (1 << 5) + (1 << 46)
    assert not np.array_equal(a, idf.template_masks(bytes(16), 50, 7, 5))


def scaled(observations):
    values, bits = [], []
    for o in observations:
        if o.kappa:
            values.extend(v / 2 ** (o.bits + 1 + o.kappa) for v in o.values)
        else:
            bits.extend(o.values)
    return np.array(values), np.array(bits)


def test_what_s2_sees_does_not_depend_on_who_matched(s1, user_keys, key_cloud):
    """S2's record (every masked value and bit it obtains) for queries matching the first template
    against queries matching the last: indistinguishable, and uniform (a family of 5 tests)."""
    t = templates(24)
    g = gallery(s1, t, 200)
    records = []
    for target in (0, 23):
        key_cloud.observations.clear()
        for _ in range(6):
            x = near(t, target, noise=1)
            assert identify(s1, g, x, user_keys) == idf.identify_reference(t, x, 200) == target
        records.append(scaled(key_cloud.observations))
    (va, ba), (vb, bb) = records
    assert len(va) == len(vb) > 400 and len(ba) == len(bb) >= 144  # DGK: one zero-test bit per comparison
    p_each = P_THRESHOLD / 5
    assert stats.ks_2samp(va, vb, method="asymp").pvalue > p_each
    for values in (va, vb):
        assert stats.kstest(values, "uniform").pvalue > p_each
    for bits in (ba, bb):
        assert stats.binomtest(int(bits.sum()), len(bits), 0.5).pvalue > p_each
    # negative control: the similarities themselves, as S2 would see them unmasked, tell the two apart
    sims_a = [int(v) for v in t.dot(np.array(near(t, 0, 0), dtype=object))]
    assert stats.kstest(np.array(sims_a) / 2 ** 20 + 0.5, "uniform").pvalue < P_THRESHOLD


def test_s2_refuses_malformed_gallery_rounds_with_4xx_errors(s1, key_cloud, user_keys):
    """Every identification step of S2, given broken messages: one of the project's 4xx errors, never
    another exception, and S2 still answers afterwards."""
    t = templates(6)
    g = gallery(s1, t, 0)
    pk = s1.public_key
    seed = EncryptedTensor.encrypt(pk, [1]).data
    cases = [
        (idf.SETUP_STEP, Message(meta={"gallery_id": "x", "first": 0, "features": F, "template_bits": LT,
                                       "counts": []})),
        (idf.SETUP_STEP, Message(meta={"gallery_id": "x" * 65, "first": 0, "features": F, "template_bits": LT,
                                       "counts": [1]}, arrays={"seeds": seed}, widths={"seeds": pk.ciphertext_bytes})),
        (idf.SETUP_STEP, Message(meta={"gallery_id": "y", "first": 0, "features": F, "template_bits": 99,
                                       "counts": [1]}, arrays={"seeds": seed}, widths={"seeds": pk.ciphertext_bytes})),
        (idf.SETUP_STEP, Message(meta={"gallery_id": "y", "first": 0, "features": F, "template_bits": LT,
                                       "counts": [1]}, arrays={"seeds": EncryptedTensor.encrypt(pk, [1 << 200]).data},
                                 widths={"seeds": pk.ciphertext_bytes})),
        (idf.SETUP_STEP, Message(meta={"gallery_id": g.gallery_id, "first": 5, "features": F, "template_bits": LT,
                                       "counts": [1]}, arrays={"seeds": seed}, widths={"seeds": pk.ciphertext_bytes})),
        (idf.PREPARE_STEP, Message(meta={"gallery_id": g.gallery_id, "x_bits": 0, "kappa": 40, "counts": [6]})),
        (idf.PREPARE_STEP, Message(meta={"gallery_id": g.gallery_id, "x_bits": LX, "kappa": 20, "counts": [6]})),
        (idf.PREPARE_STEP, Message(meta={"gallery_id": g.gallery_id, "x_bits": LX, "kappa": 40, "counts": [6, 1]})),
        (idf.PREPARE_STEP, Message(meta={"gallery_id": "nope", "x_bits": LX, "kappa": 40, "counts": [6]})),
        (idf.STEP, Message(meta={"ticket": "0" * 32, "gallery_id": g.gallery_id})),
        (idf.UNPACK_STEP, Message(meta={"y_count": 1, "y_bits": 4, "kappa": 40, "shift": 0})),
        (idf.UNPACK_STEP, Message(meta={"shift": 3})),
    ]
    cases += [(idf.MASKS_STEP, Message(meta={"ticket": "0" * 32, "gallery_id": g.gallery_id})),
              (idf.DROP_STEP, Message(meta={"gallery": g.gallery_id}))]
    for count, bits in ((1, 9), (6 * 99, 9), (-1, 9), (6, -3)):  # each after a real first round (its ticket)
        first = Message(meta={"gallery_id": g.gallery_id, "x_bits": LX, "kappa": 40, "counts": [6],
                              "tags": [idf.chunk_tag(g.chunks[0].seed.data[0])]})
        ticket = decode(key_cloud.handle(idf.PREPARE_STEP, encode(first))).get("ticket", str)
        cases.append((idf.MASKS_STEP, Message(meta={"ticket": ticket, "gallery_id": g.gallery_id,
                                                    "u_count": count, "u_bits": bits, "kappa": 40})))
    for step, msg in cases:
        with pytest.raises(HECNNError) as caught:
            key_cloud.handle(step, encode(msg))
        assert 400 <= caught.value.status < 500, (step, caught.value)
    x = [1] * F
    assert idf.identify_reference(t, x, 0) == identify(s1, g, x, user_keys)


def test_one_batch_prepares_k_queries_each_used_once(s1, user_keys, key_cloud):
    t = templates(23)
    g = gallery(s1, t, 100, chunks=(10,))
    batch = idf.prepare_identify(s1, g)
    assert len(batch) == idf.batch_size(s1.public_key.bits, LX, LT, F) >= 4
    assert len({p.ticket for p in batch}) == len(batch) and all(p.groups == tuple(range(g.groups)) for p in batch)
    for i, prepared in zip((3, 12, 22, 0), batch):
        x = near(t, i, noise=1)
        out = idf.secure_identify(s1, g, EncryptedTensor.encrypt(s1.public_key, x), prepared, user_keys.public)
        assert idf.read_answer(out.decrypt(user_keys.private)[0], g.count) == idf.identify_reference(t, x, 100)


def test_a_batch_prepared_before_an_append_serves_no_search_after_it(s1, user_keys):
    t = templates(40)
    g = gallery(s1, t, 250, chunks=(17,))
    before = idf.EncryptedGallery(g.gallery_id, F, LT, LX, g.threshold, g.chunks[:1])
    old = idf.prepare_identify(s1, before)[0]
    x = EncryptedTensor.encrypt(s1.public_key, near(t, 30, noise=1))
    with pytest.raises(ProtocolError, match="does not cover"):
        idf.secure_identify(s1, g, x, old, user_keys.public)
    with pytest.raises(ShapeError):
        g.group_of(40)
    assert g.group_of(39) == g.groups - 1 and g.group_of(16) == g.group_of(0) + (16 // g.group_size)


def test_a_search_over_fewer_chunks_than_s2_holds_works(s1, user_keys):
    """S1 searches the gallery it published while an append's set-up already reached S2 (a commit in flight)."""
    t = templates(20)
    g = gallery(s1, t, 50, chunks=(12,))
    published = idf.EncryptedGallery(g.gallery_id, F, LT, LX, g.threshold, g.chunks[:1])
    x = near(t, 5, noise=1)
    out = idf.secure_identify(s1, published, EncryptedTensor.encrypt(s1.public_key, x),
                              idf.prepare_identify(s1, published)[0], user_keys.public)
    assert idf.read_answer(out.decrypt(user_keys.private)[0], 12) == idf.identify_reference(t[:12], x, 50)


def test_s2_losing_its_state_is_reported_as_such(s1, user_keys, key_cloud):
    from he_cnn.errors import UnknownGallery, UnknownPrepared
    t = templates(8)
    g = gallery(s1, t, 0)
    prepared = idf.prepare_identify(s1, g)[0]
    key_cloud.prepared = type(key_cloud.prepared)(ttl=60)  # a restart: the prepared masks are gone
    x = EncryptedTensor.encrypt(s1.public_key, [1] * F)
    with pytest.raises(UnknownPrepared):
        idf.secure_identify(s1, g, x, prepared, user_keys.public)
    del key_cloud.galleries[g.gallery_id]  # and the seeds
    with pytest.raises(UnknownGallery):
        idf.prepare_identify(s1, g)
    idf.setup_gallery(s1, g, 0)
    out = idf.secure_identify(s1, g, x, idf.prepare_identify(s1, g)[0], user_keys.public)
    assert idf.read_answer(out.decrypt(user_keys.private)[0], 8) == idf.identify_reference(t, [1] * F, 0)
    assert idf.drop_gallery(s1, g.gallery_id) and not idf.drop_gallery(s1, g.gallery_id)
    with pytest.raises(UnknownGallery):
        idf.prepare_identify(s1, g)


def test_what_s2_sees_while_preparing_does_not_depend_on_the_templates(s1, key_cloud):
    """The offline reveal (A_q . B_i + M per template and query) for a gallery of the largest templates
    against one of the smallest: S2's values are uniform and indistinguishable (B = T~ - T differs)."""
    records = []
    for value in ((1 << LT) - 1, -((1 << LT) - 1)):
        g = gallery(s1, np.full((30, F), value, dtype=object), 0)
        key_cloud.observations.clear()
        idf.prepare_identify(s1, g)
        records.append(scaled([o for o in key_cloud.observations if o.step == "u"])[0])
    a, b = records
    assert len(a) == len(b) >= 30 * 4
    assert stats.ks_2samp(a, b, method="asymp").pvalue > P_THRESHOLD / 3
    for values in (a, b):
        assert stats.kstest(values, "uniform").pvalue > P_THRESHOLD / 3


def test_s2_keeps_a_bounded_number_of_prepared_queries():
    from he_cnn.parties.key_cloud import TicketStore
    store = TicketStore(ttl=60, max_weight=30)
    tickets = [store.put("identify", i, weight=10) for i in range(5)]
    assert len(store) == 3 and [store.pop(t, "identify") for t in tickets[2:]] == [2, 3, 4]
    with pytest.raises(ProtocolError, match="unknown or expired"):
        store.pop(tickets[0], "identify")
    heavy = store.put("identify", "heavy", weight=25)
    store.put("identify", "light", weight=10)  # the heavy one goes: 35 > 30
    assert len(store) == 1
    with pytest.raises(ProtocolError):
        store.pop(heavy, "identify")


@pytest.mark.slow
@pytest.mark.parametrize("comparison", ["ot", "dgk"])
def test_identify_and_verify_at_2048_bits_with_a_tie_and_no_match(comparison):
    """The acceptance's 2048-bit queries, in process: a tie between the two best templates (the smaller
    index wins), a query with no match, a plain match, a batch shared by all of them, and a verify."""
    from he_cnn.crypto.paillier import generate_keypair
    from he_cnn.parties.key_cloud import KeyCloud
    from he_cnn.protocols.common import S1Context
    from he_cnn.transport.channel import InProcessChannel
    keys, user = generate_keypair(2048), generate_keypair(2048)
    cloud = KeyCloud.create(keys)
    ctx = S1Context(keys.public, cloud.dgk_public, InProcessChannel(cloud.handle), comparison=comparison)
    t = templates(40)
    t[31] = t[9]
    threshold = 300
    g = gallery(ctx, t, threshold, chunks=(25,))
    batch = idf.prepare_identify(ctx, g)
    queries = [near(t, 9, noise=0), [0] * F, near(t, 33, noise=1)]
    for x, prepared in zip(queries, batch):
        out = idf.secure_identify(ctx, g, EncryptedTensor.encrypt(keys.public, x), prepared, user.public)
        assert idf.read_answer(out.decrypt(user.private)[0], 40) == idf.identify_reference(t, x, threshold)
    assert idf.identify_reference(t, queries[0], threshold) == 9  # tied with 31
    assert idf.identify_reference(t, queries[1], threshold) is None
    out = idf.secure_verify(ctx, g, EncryptedTensor.encrypt(keys.public, queries[2]), 33, batch[3], user.public)
    assert (idf.read_answer(out.decrypt(user.private)[0], 40) == 33) == idf.verify_reference(t, queries[2], threshold, 33)


def test_s2_refuses_a_search_over_chunks_it_holds_other_seeds_for(s1, user_keys, key_cloud):
    """S2 restored from a backup taken before S1 replaced a chunk's seeds (the same template count): the
    chunk tags differ, S2 says so, and S1 relays the seeds again: the answer stays exact."""
    from he_cnn.errors import UnknownGallery
    t = templates(10)
    g = gallery(s1, t, 0)
    replaced = idf.enrol_chunk(s1.public_key, t, LT, LX)  # the same templates under a new seed
    old = key_cloud.galleries[g.gallery_id]
    g.chunks[0] = replaced
    with pytest.raises(UnknownGallery):
        idf.prepare_identify(s1, g)
    idf.setup_gallery(s1, g, 0)
    assert key_cloud.galleries[g.gallery_id] != old
    x = near(t, 4, noise=1)
    out = idf.secure_identify(s1, g, EncryptedTensor.encrypt(s1.public_key, x), idf.prepare_identify(s1, g)[0],
                              user_keys.public)
    assert idf.read_answer(out.decrypt(user_keys.private)[0], 10) == idf.identify_reference(t, x, 0)
