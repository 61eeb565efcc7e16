"""Python stubs for the AuthPool gRPC service.

The generated messages and stubs live in `authpool_client.api`::

    import grpc
    from authpool_client.api import authpool_pb2, authpool_pb2_grpc

    channel = grpc.insecure_channel("127.0.0.1:50051")
    stub = authpool_pb2_grpc.AuthPoolStub(channel)
    reply = stub.Allocate(authpool_pb2.AllocateRequest(client_id="worker-7"), timeout=5)
"""

from authpool_client.api import authpool_pb2, authpool_pb2_grpc

__all__ = ["authpool_pb2", "authpool_pb2_grpc"]
