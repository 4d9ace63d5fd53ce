"""The dtypes a kind's row-sparse tables may be stored in (`<kind>.table_dtype`)."""
import torch

TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
