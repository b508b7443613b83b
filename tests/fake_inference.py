"""An in-process fake of the Inference service (a real grpc server on a loopback port, scripted
answers), for testing clients without a model: every call is recorded, and the test decides
which statuses come back and when."""

from __future__ import annotations

import datetime
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardgate.proto import inference_pb2, inference_pb2_grpc

STREAM_TOKENS = [5, 6, 7]


@dataclass
class Call:
    method: str
    request: object
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class FakeInference(inference_pb2_grpc.InferenceServicer):
    failures: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    """Statuses to abort the next calls with, one per call, before any answer."""
    fail_after_tokens: tuple[int, grpc.StatusCode] | None = None
    """GenerateStream: send this many tokens, then abort with this code (once)."""
    stall: bool = False
    """Hold every call but ModelInfo until the test ends (to make deadlines pass, to keep requests in flight)."""
    calls: list[Call] = field(default_factory=list)
    on_call: object = None
    """Called with (method, context) for each call (e.g. to open a server span)."""
    release: threading.Event = field(default_factory=threading.Event)

    def _enter(self, method: str, request, context) -> None:
        self.calls.append(Call(method, request, dict(context.invocation_metadata()), context.time_remaining()))
        if self.on_call is not None:
            self.on_call(method, context)
        if self.stall and method != "ModelInfo":
            self.release.wait(30)
        if self.failures:
            code, details = self.failures.pop(0)
            context.abort(code, details)

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        return inference_pb2.GenerateResponse(
            request_id=request.request_id or "made-by-server",
            text="abc",
            token_ids=STREAM_TOKENS,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=2, completion_tokens=3, queue_time_s=0.01, time_to_first_token_s=0.02),
        )

    def GenerateStream(self, request, context):
        self._enter("GenerateStream", request, context)
        for n, token in enumerate(STREAM_TOKENS):
            if self.fail_after_tokens is not None and n == self.fail_after_tokens[0]:
                code, self.fail_after_tokens = self.fail_after_tokens[1], None
                context.abort(code, "failed mid-stream")
            yield inference_pb2.GenerateStreamResponse(request_id=request.request_id, text=chr(ord("a") + n), token_ids=[token])
        yield inference_pb2.GenerateStreamResponse(
            request_id=request.request_id,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=2, completion_tokens=len(STREAM_TOKENS)),
        )

    def Embed(self, request, context):
        self._enter("Embed", request, context)
        # Vector i of an input is (its length, its index, pooling, normalize): easy to check.
        return inference_pb2.EmbedResponse(
            request_id=request.request_id,
            embeddings=[
                inference_pb2.Embedding(values=[len(text), i, request.pooling, float(request.normalize)], tokens=len(text))
                for i, text in enumerate(request.inputs)
            ],
            usage=inference_pb2.Usage(prompt_tokens=sum(len(t) for t in request.inputs)),
        )

    def GenerateBidi(self, request_iterator, context):
        """Each generate gets its tokens at once (a bad max_new_tokens an error event); a cancel
        gets a CANCELLED last message."""
        self._enter("GenerateBidi", None, context)
        for message in request_iterator:
            if message.WhichOneof("action") == "cancel":
                request_id = message.cancel.request_id
                yield _bidi(request_id, finish_reason=inference_pb2.FINISH_REASON_CANCELLED)
                continue
            request = message.generate
            if request.max_new_tokens == 0:
                yield inference_pb2.GenerateBidiResponse(
                    error=inference_pb2.RequestStatus(
                        request_id=request.request_id, code=3, message="max_new_tokens: must be in [1, 4096], got 0"
                    )
                )
                continue
            for n in range(request.max_new_tokens):
                yield _bidi(request.request_id, text=f"{request.request_id}:{n} ", token_ids=[n])
            yield _bidi(
                request.request_id,
                finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                usage=inference_pb2.Usage(completion_tokens=request.max_new_tokens),
            )

    def Tokenize(self, request, context):
        self._enter("Tokenize", request, context)
        if request.WhichOneof("input") == "messages":  # "rendered" as role:content lines
            text = "".join(f"{m.role}:{m.content}\n" for m in request.messages.messages)
            return inference_pb2.TokenizeResponse(token_ids=[ord(c) for c in text], tokens=list(text), text=text)
        ids = [ord(c) for c in request.text]
        return inference_pb2.TokenizeResponse(token_ids=([1] if request.add_special_tokens else []) + ids, tokens=list(request.text))

    def ModelInfo(self, request, context):
        self._enter("ModelInfo", request, context)
        return inference_pb2.ModelInfoResponse(
            model="fake",
            model_type="llama",
            vocab_size=300,
            max_context_tokens=128,
            max_new_tokens_limit=64,
            dtype="float32",
            tp=1,
            pp=1,
            replicas=1,
            kv_capacity_tokens=[1024],
            devices=["cpu"],
            eos_token_ids=[2],
            hidden_size=4,
            max_embed_inputs=8,
            quantization="int8",
            weight_bytes_per_step=1234,
            kv_bytes_per_token=64,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=4,
        )


def _bidi(request_id: str, **fields) -> inference_pb2.GenerateBidiResponse:
    return inference_pb2.GenerateBidiResponse(message=inference_pb2.GenerateStreamResponse(request_id=request_id, **fields))


@dataclass
class FakeServer:
    fake: FakeInference
    server: grpc.Server
    address: str
    health: health.HealthServicer

    def stop(self) -> None:
        self.fake.release.set()
        self.server.stop(0)


def start_fake_server(server_credentials: grpc.ServerCredentials | None = None) -> FakeServer:
    """The fake on 127.0.0.1 (a free port), TLS when server_credentials are given."""
    fake = FakeInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server_credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials)
    server.start()
    return FakeServer(fake, server, f"127.0.0.1:{port}", health_servicer)


def self_signed_certificate(common_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for localhost and 127.0.0.1, valid for a day."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
