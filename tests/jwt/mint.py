"""Mints JWTs with PyJWT, an implementation outrider did not write.

Reads a JSON request on stdin:
  {"keys": [{"kid": "rs", "alg": "RS256"}, ...],
   "tokens": [{"name": "good", "kid": "rs", "alg": "RS256", "claims": {...},
               "headers": {...}, "secret_from": "rs"}]}
and writes {"jwks": {...}, "every_key": {...}, "tokens": {"good": "<jwt>"}}
on stdout: `jwks` holds the keys not marked `"publish": false`.

Keys are generated fresh with `cryptography`. A token with "secret_from"
is signed with HS256 keyed by that key's public PEM (the algorithm
confusion attack); "kid_override" signs with one key but names another.
"""

import json
import sys

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

GENERATE = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}

ALGORITHM = {
    "RS256": jwt.algorithms.RSAAlgorithm,
    "PS256": jwt.algorithms.RSAPSSAlgorithm,
    "ES256": jwt.algorithms.ECAlgorithm,
    "ES384": jwt.algorithms.ECAlgorithm,
    "EdDSA": jwt.algorithms.OKPAlgorithm,
}


def main():
    request = json.load(sys.stdin)
    keys = {}
    jwks = []
    every = []
    for spec in request["keys"]:
        private = GENERATE[spec["alg"]]()
        keys[spec["kid"]] = private
        public = json.loads(ALGORITHM[spec["alg"]].to_jwk(private.public_key()))
        public["kid"] = spec["kid"]
        public["use"] = "sig"
        every.append(public)
        if spec.get("publish", True):
            jwks.append(public)
    tokens = {}
    for spec in request.get("tokens", []):
        headers = dict(spec.get("headers", {}))
        headers["kid"] = spec.get("kid_override", spec["kid"])
        if "secret_from" in spec:
            pem = keys[spec["secret_from"]].public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            # PyJWT refuses PEM keys as HMAC secrets; sign by hand with
            # its HMAC algorithm object, which is what an attacker does.
            signer = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256)
            header = {"alg": "HS256", "typ": "JWT", **headers}
            segments = [
                jwt.utils.base64url_encode(json.dumps(header, separators=(",", ":")).encode()),
                jwt.utils.base64url_encode(json.dumps(spec["claims"], separators=(",", ":")).encode()),
            ]
            signing_input = b".".join(segments)
            signature = signer.sign(signing_input, pem)
            tokens[spec["name"]] = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
            continue
        tokens[spec["name"]] = jwt.encode(
            spec["claims"], keys[spec["kid"]], algorithm=spec["alg"], headers=headers
        )
    json.dump({"jwks": {"keys": jwks}, "every_key": {"keys": every}, "tokens": tokens}, sys.stdout)


if __name__ == "__main__":
    main()
