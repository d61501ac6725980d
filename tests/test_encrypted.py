"""Encrypted inference against the plaintext network, on real MNIST images."""
from __future__ import annotations

import numpy as np
import openfhe
import pytest

from h33_bento import simulate, zoo
from h33_bento.ckks.keys import KeyChain
from h33_bento.client import FHEInferenceClient
from h33_bento.program.report import uncached_plaintexts
from h33_bento.runtime.engine import Engine, PlaintextCache

from conftest import assert_logits_close, held_bytes


def test_compiled_program_matches_torch_on_full_test_set(cnn, cnn_compiled, mnist_test):
    x, _ = mnist_test
    ref = zoo.predict_logits(cnn, x)
    sim = simulate(cnn_compiled, x)
    assert_logits_close(sim, ref, rel=1e-3)
    agree = (sim.argmax(1) == ref.argmax(1)).mean()
    assert agree >= 0.999, f"simulate argmax agrees on only {agree:.4%} of 10k test images"


def test_fusion_folds_bn_and_pooling_into_two_linear_steps(cnn_compiled):
    ops = [s.op for s in cnn_compiled.steps]
    assert ops == ["linear", "square", "linear", "square", "linear"]
    assert cnn_compiled.depth == 5
    assert cnn_compiled.params.security_level == "HEStd_128_classic"


def test_encrypted_matches_plaintext_on_64_real_images(cnn, cnn_client, mnist_test):
    x, y = mnist_test[0][:64], mnist_test[1][:64]
    ref = zoo.predict_logits(cnn, x)
    got = np.concatenate([cnn_client.decrypt_logits(cnn_client.infer(cnn_client.encrypt(x[i:i + 8])))
                          for i in range(0, 64, 8)])
    assert_logits_close(got, ref)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (got.argmax(1) == y).mean() > 0.85


def test_eight_different_images_in_one_ciphertext(cnn, cnn_client, mnist_test):
    x, y = mnist_test
    # eight different digits, one of each class 0..7, that the plaintext model gets right
    ref_pred = zoo.predict_logits(cnn, x[:200]).argmax(1)
    picks = [int(np.flatnonzero((y[:200] == d) & (ref_pred == d))[0]) for d in range(8)]
    enc = cnn_client.encrypt(x[picks])
    assert len(enc.ciphertexts) == 1 and enc.lanes_used == 8
    preds = cnn_client.decrypt(cnn_client.infer(enc))
    assert [p.index for p in preds] == list(range(8))
    assert all(p.label == str(d) for p, d in zip(preds, range(8)))


def test_single_input_envelope_and_prediction_api(cnn, cnn_client, mnist_test):
    x = mnist_test[0][0]
    pred = cnn_client.decrypt(cnn_client.infer(cnn_client.encrypt(x)))
    ref = zoo.predict_logits(cnn, x[None])[0]
    assert pred.index == int(ref.argmax())
    top = pred.top_k(3)
    assert len(top) == 3 and top[0][0] == pred.label
    assert abs(sum(pred.probabilities) - 1) < 1e-9
    assert top[0][1] == pytest.approx(pred.confidence)
    assert top[0][1] >= top[1][1] >= top[2][1]


def test_infer_batch_handles_any_count(cnn, cnn_client, mnist_test):
    x = mnist_test[0][:11]
    preds = cnn_client.infer_batch(x)
    assert [p.index for p in preds] == list(zoo.predict_logits(cnn, x).argmax(1))


def test_benchmark_convnet_encrypted(convnet, convnet_client, mnist_test):
    x = mnist_test[0][:8]
    got = convnet_client.decrypt_logits(convnet_client.infer(convnet_client.encrypt(x)))
    ref = zoo.predict_logits(convnet, x)
    assert_logits_close(got, ref)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_server_never_holds_the_secret_key(convnet_compiled):
    chain = KeyChain.generate(convnet_compiled.params)
    secret = openfhe.Serialize(chain._secret_key, openfhe.BINARY)
    bundle = chain.evaluation_keys().to_bytes()
    engine = Engine(convnet_compiled, bundle)
    # any 64-byte window of the secret key's coefficient data would betray it
    windows = [secret[i:i + 64] for i in range(len(secret) // 4, len(secret) - 64, len(secret) // 16)]
    assert windows
    assert not any(w in bundle for w in windows)
    for held in held_bytes(engine):
        assert not any(w in held for w in windows)
    assert not any(isinstance(v, openfhe.PrivateKey) for v in vars(engine).values())


def test_engine_output_equals_simulate(convnet_compiled, convnet_client, mnist_test):
    x = mnist_test[0][100:108]
    got = convnet_client.decrypt_logits(convnet_client.infer(convnet_client.encrypt(x)))
    assert_logits_close(got, simulate(convnet_compiled, x), rel=1e-3)


def test_plan_predicts_what_a_small_plaintext_cache_encodes_every_run(convnet_compiled, convnet_client, mnist_test):
    budget = convnet_compiled.summary()["plaintext_bytes"] // 2
    predicted = sum(uncached_plaintexts(convnet_compiled, budget).values())
    assert predicted > 0
    cache = PlaintextCache(convnet_compiled, budget)
    engine = Engine(convnet_compiled, convnet_client.keys.evaluation_keys(), cache=cache)
    enc = convnet_client.encrypt(mnist_test[0][:8])
    engine.run(enc)
    assert 0 < cache.used <= budget
    misses = cache.misses
    engine.run(enc)
    assert cache.misses - misses == predicted


def test_engines_of_one_model_share_a_plaintext_cache_and_can_drop_serialized_keys(
        convnet_compiled, convnet_client, cnn_compiled, mnist_test):
    """What a server holding one engine per client key relies on (BentoML service, MLflow pyfunc)."""
    x = mnist_test[0][:8]
    want = simulate(convnet_compiled, x)
    bundle = convnet_client.keys.evaluation_keys()
    assert Engine(convnet_compiled, bundle).keys.rotation_bytes == bundle.rotation_bytes > 0  # kept by default

    cache = PlaintextCache(convnet_compiled)
    first = Engine(convnet_compiled, bundle, cache=cache, keep_serialized_keys=False)
    assert first.cache is cache
    assert first.keys.mult_key == b"" and first.keys.rotation_bytes == 0
    assert first.keys.public_key == bundle.public_key and first.keys.key_tag == bundle.key_tag
    assert_logits_close(convnet_client.decrypt_logits(first.run(convnet_client.encrypt(x))), want, rel=1e-3)
    cached, misses = len(cache._items), cache.misses
    assert cached > 0

    # another client's engine: its first run finds every diagonal the first run cached
    other = FHEInferenceClient(convnet_compiled)
    second = Engine(convnet_compiled, other.keys.evaluation_keys(), cache=cache, keep_serialized_keys=False)
    assert_logits_close(other.decrypt_logits(second.run(other.encrypt(x))), want, rel=1e-3)
    assert cache.misses - misses == misses - cached and len(cache._items) == cached

    # the slimmed bundle builds another engine while its keys stay installed (a server's LRU refill)
    again = Engine(convnet_compiled, first.keys, cache=cache)
    assert_logits_close(convnet_client.decrypt_logits(again.run(convnet_client.encrypt(x))), want, rel=1e-3)

    with pytest.raises(ValueError, match="plaintext cache belongs to model"):
        Engine(cnn_compiled, bundle, cache=cache)
