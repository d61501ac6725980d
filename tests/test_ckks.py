"""CKKS layer: parameters, 128-bit selection, key bundles and the wire format's error classes."""
from __future__ import annotations

import dataclasses

import numpy as np
import openfhe
import pytest
from pydantic import ValidationError

from h33_bento.ckks.context import get_context
from h33_bento.ckks.keys import EvaluationKeys, KeyChain
from h33_bento.ckks.params import CKKSParams, max_depth, select_params
from h33_bento.ckks.serialization import EncryptedTensor
from h33_bento.program.polynomials import chebyshev_depth, eval_chebyshev, to_openfhe_coeffs
from h33_bento.errors import (
    DepthExceededError,
    EnvelopeError,
    KeyMismatchError,
    ModelMismatchError,
    ParamsMismatchError,
    TamperedDataError,
    TruncatedDataError,
    UnsupportedVersionError,
)
from h33_bento.runtime.engine import Engine


def test_params_validate_fingerprint_and_roundtrip_json():
    p = select_params(5, 8192)
    assert p.ring_dim == 16384 and p.security_level == "HEStd_128_classic"
    again = CKKSParams.model_validate_json(p.model_dump_json())
    assert again == p and again.fingerprint == p.fingerprint
    other = CKKSParams(**{**p.model_dump(), "scale_bits": 39})
    assert other.fingerprint != p.fingerprint
    with pytest.raises(ValidationError, match="power of two"):
        CKKSParams(**{**p.model_dump(), "ring_dim": 12000})
    with pytest.raises(ValidationError, match="lanes"):
        CKKSParams(**{**p.model_dump(), "lanes": 3})


def test_select_params_picks_smallest_secure_ring():
    assert select_params(5, 1024).ring_dim == 16384  # depth 5 needs 2^14 at 128 bits
    assert select_params(6, 1024).ring_dim == 32768
    assert select_params(2, 8192).ring_dim == 16384  # slots force the ring up
    with pytest.raises(DepthExceededError, match="needs 40 multiplicative levels.*at most 30"):
        select_params(40, 1024)


def test_max_depth_matches_openfhe_at_128_bits():
    assert max_depth(1 << 14) == 5
    assert max_depth(1 << 15) == 14


@pytest.mark.parametrize("degree", [2, 3, 5, 6, 13])
@pytest.mark.parametrize("lower,upper", [(-1.0, 1.0), (-3.0, 5.0)])
def test_chebyshev_depth_matches_openfhe(degree, lower, upper):
    depth = chebyshev_depth(degree, lower, upper)
    params = select_params(depth, 512)
    cc = get_context(params)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    x = np.linspace(lower, upper, params.slots) * 0.9
    ct = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(x))
    coeffs = np.linspace(1.0, 0.1, degree + 1)
    out = cc.EvalChebyshevSeries(ct, to_openfhe_coeffs(coeffs), lower, upper)
    assert out.GetLevel() + out.GetNoiseScaleDeg() - 1 == depth
    pt = cc.Decrypt(out, keys.secretKey)
    pt.SetLength(params.slots)
    want = eval_chebyshev(coeffs, lower, upper, x)
    assert np.abs(np.array(pt.GetRealPackedValue()) - want).max() < 1e-5


@pytest.fixture(scope="module")
def small_params():
    return CKKSParams(**{**select_params(2, 512).model_dump(), "rotation_indices": (8, 16)})


@pytest.fixture(scope="module")
def chain(small_params):
    return KeyChain.generate(small_params)


def test_evaluation_keys_roundtrip_and_hold_no_secret(chain, small_params):
    bundle = chain.evaluation_keys()
    data = bundle.to_bytes()
    back = EvaluationKeys.from_bytes(data, small_params)
    assert back == bundle and back.key_id == chain.key_id
    assert back.rotation_indices == (8, 16)
    secret = openfhe.Serialize(chain._secret_key, openfhe.BINARY)
    assert secret[len(secret) // 2: len(secret) // 2 + 64] not in data


def test_key_bundle_for_other_params_is_refused(chain, small_params):
    other = CKKSParams(**{**small_params.model_dump(), "scale_bits": 39})
    with pytest.raises(ParamsMismatchError, match="made for CKKS params"):
        EvaluationKeys.from_bytes(chain.evaluation_keys().to_bytes(), other)


# 128-bit parameters with the fewest digits accepted; OpenFHE's default (0: three); one digit of
# exactly 180 bits, which takes four 60-bit special primes, not three
@pytest.mark.parametrize("depth, digits", [(None, None), (5, 0), (3, 1)])
def test_key_sizes_estimated_from_parameters_match_openfhe(small_params, depth, digits):
    params = small_params if depth is None else CKKSParams(**{
        **small_params.model_dump(), "ring_dim": 8192, "multiplicative_depth": depth, "num_large_digits": digits,
        "security_level": "HEStd_NotSet"})
    bundle = KeyChain.generate(params, "HEStd_NotSet").evaluation_keys()
    est = params.estimated_key_bytes()
    rotations = len(params.rotation_indices)
    for got, want in ((len(bundle.public_key), est["public"]), (len(bundle.mult_key), est["mult"]),
                      (bundle.rotation_bytes, rotations * est["rotation"])):
        assert abs(got - want) < 0.01 * want


def test_keychain_save_load(tmp_path, chain):
    chain.save(tmp_path / "keys")
    assert (tmp_path / "keys" / "secret.key").stat().st_mode & 0o077 == 0
    loaded = KeyChain.load(tmp_path / "keys")
    assert loaded.key_id == chain.key_id
    blob = chain.encrypt_slots(np.arange(loaded.params.slots) / 1000.0)
    assert np.allclose(loaded.decrypt_slots(blob)[:5], np.arange(5) / 1000.0, atol=1e-6)
    with pytest.raises(EnvelopeError, match="incomplete"):
        KeyChain.load(tmp_path / "missing")


def test_keychain_loads_one_key_for_encrypting_or_decrypting(tmp_path, chain):
    chain.save(tmp_path / "keys")
    (tmp_path / "keys" / "evaluation_keys.h33k").unlink()  # neither side reads the bundle
    public = KeyChain.load(tmp_path / "keys", only="public")
    secret = KeyChain.load(tmp_path / "keys", only="secret")
    assert public.key_id == secret.key_id == chain.key_id
    blob = public.encrypt_slots(np.arange(public.params.slots) / 1000.0)  # a public-key encryption
    assert np.allclose(secret.decrypt_slots(blob)[:5], np.arange(5) / 1000.0, atol=1e-6)
    with pytest.raises(EnvelopeError, match="without its secret key"):
        public.decrypt_slots(blob)
    with pytest.raises(EnvelopeError, match="evaluation_keys.h33k is missing"):
        secret.evaluation_keys()


# ---------------------------------------------------------------- envelopes
@pytest.fixture(scope="module")
def envelope(convnet_client, mnist_test):
    return convnet_client.encrypt(mnist_test[0][0])


def test_envelope_roundtrip(envelope):
    data = envelope.to_bytes()
    back = EncryptedTensor.from_bytes(data)
    assert back.to_bytes() == data and back.shape == envelope.shape


def test_truncated_envelope(envelope):
    data = envelope.to_bytes()
    for cut in (5, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(TruncatedDataError, match="truncated"):
            EncryptedTensor.from_bytes(data[:cut])


def test_tampered_envelope(envelope):
    data = bytearray(envelope.to_bytes())
    data[len(data) // 2] ^= 0x01
    with pytest.raises(TamperedDataError, match="modified"):
        EncryptedTensor.from_bytes(bytes(data))
    with pytest.raises(TamperedDataError, match="trailing"):
        EncryptedTensor.from_bytes(envelope.to_bytes() + b"x")


def test_wrong_version(envelope):
    data = bytearray(envelope.to_bytes())
    data[4:6] = (99).to_bytes(2, "big")
    with pytest.raises(UnsupportedVersionError, match="version 99"):
        EncryptedTensor.from_bytes(bytes(data))


def test_not_an_envelope():
    with pytest.raises(EnvelopeError, match="not an h33"):
        EncryptedTensor.from_bytes(b"GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE")


def test_wrong_model_params_and_key_are_refused(envelope, convnet_compiled, convnet_client, cnn_compiled):
    engine = Engine(convnet_compiled, convnet_client.keys.evaluation_keys())
    with pytest.raises(ModelMismatchError, match="made for model"):
        engine.run(dataclasses.replace(envelope, model_fingerprint="0" * 32))
    with pytest.raises(ParamsMismatchError, match="made for CKKS params"):
        engine.run(dataclasses.replace(envelope, params_fingerprint="0" * 32))
    with pytest.raises(KeyMismatchError, match="not loaded"):
        engine.run(dataclasses.replace(envelope, key_id="f" * 32))
    # a ciphertext made under another key but relabelled with this key_id
    stranger = KeyChain.generate(convnet_compiled.params)
    forged = dataclasses.replace(envelope, ciphertexts=[stranger.encrypt_slots(np.zeros(convnet_compiled.params.slots))])
    with pytest.raises(KeyMismatchError, match="another key|other than"):
        engine.run(forged)
    # an envelope for a different model entirely
    with pytest.raises(EnvelopeError):
        Engine(cnn_compiled, convnet_client.keys.evaluation_keys())


def test_garbage_ciphertext_blob_is_refused(envelope, convnet_compiled, convnet_client):
    engine = Engine(convnet_compiled, convnet_client.keys.evaluation_keys())
    junk = dataclasses.replace(envelope, ciphertexts=[b"\x00" * 1000])
    with pytest.raises(TamperedDataError, match="deserialized"):
        engine.run(junk)
    # the engine still works afterwards
    assert engine.run(envelope).lanes_used == 1
