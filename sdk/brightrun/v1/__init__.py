"""Generated protobuf and gRPC code for the brightrun.v1 contract.

Do not edit: regenerate with `python scripts/gen_protos.py`.
"""
