"""Sample from a checkpoint of train.py, as nanoGPT's sample.py does: the model continues --start byte by byte.

    uv run python examples/nanogpt/sample.py --out-dir runs/nanogpt --start "ALICE" --max-new-tokens 100
"""

import argparse
from pathlib import Path

import torch
from model import GPT, GPTConfig  # model.py beside this script, as in nanoGPT


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/nanogpt"), help="where train.py saved ckpt.pt")
    parser.add_argument("--start", default="\n", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k likeliest bytes")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    checkpoint_path = args.out_dir / "ckpt.pt"
    if not checkpoint_path.is_file():
        parser.error(f"--out-dir {args.out_dir} holds no ckpt.pt: train one with train.py --out-dir {args.out_dir}")
    if not args.start:
        parser.error("--start must hold at least one character")
    checkpoint = torch.load(checkpoint_path, map_location=args.device)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.to(args.device).eval()
    torch.manual_seed(args.seed)
    start = torch.tensor([list(args.start.encode())], dtype=torch.long, device=args.device)  # (1, T) bytes
    generated = model.generate(start, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    text = bytes(generated[0].tolist()).decode(errors="replace")  # a byte-level model may cut a UTF-8 character
    print(text)
    return text


if __name__ == "__main__":
    main()
