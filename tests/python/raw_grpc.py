"""Sends raw bytes as one unary gRPC request, with grpcio and no stubs, so that
a test can send what generated stubs never would (strings that are not UTF-8,
broken wire format). Prints the status code's name and its details.

Usage: raw_grpc.py HOST:PORT /package.Service/Method HEX_PAYLOAD
"""

import sys

import grpc


def main() -> None:
    address, method, payload = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=10)
        except grpc.RpcError as e:
            print(f"{e.code().name} {e.details()}")
            return
        print("OK")


if __name__ == "__main__":
    main()
