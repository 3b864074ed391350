"""`lmforge generate --model DIR --prompt TEXT`: sample from a model dir with its tokenizer."""

from __future__ import annotations

from lmforge.console import emit

HELP = "generate text from a model dir (KV cache; greedy, temperature, top-k, top-p)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model dir (RUN/model, an imported or fine-tuned model)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    import time

    import torch

    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.config import UserError
    from lmforge.generate.engine import generate
    from lmforge.generate.sampling import check_budget, check_sampling
    from lmforge.tokenizer.core import load_tokenizer

    check_sampling(args.temperature, args.top_k, args.top_p)  # before the model is loaded
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be positive")
    if any(not p.strip() for p in args.prompt):
        raise UserError("--prompt is empty; pass some text to continue")
    from lmforge.artifacts.identity import check_model_dir_tokenizer

    check_model_dir_tokenizer(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = load_model_dir(args.model, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(args.model)
    prompts = list(args.prompt)
    if args.chat:  # the chat template's special tokens must become their ids, not literal text
        from lmforge.tokenizer.chat_template import encode_prompt

        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    lengths = [len(p) if isinstance(p, list) else len(tokenizer.encode(p)) for p in prompts]
    check_budget(lengths, args.max_new_tokens, model.cfg.max_seq_len)
    t0 = time.perf_counter()
    outs = generate(model, prompts, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop)
    dt = time.perf_counter() - t0
    if args.chat:
        from lmforge.generate.engine import cut_at_stop

        outs = [cut_at_stop(tokenizer.decode(o), args.stop) for o in outs]
    n_tokens = sum(len(tokenizer.encode(o)) for o in outs)
    if args.json:
        emit(args, "", {"prompts": args.prompt, "completions": outs, "seconds": round(dt, 3),
                        "tokens": n_tokens})
    else:
        for p, o in zip(args.prompt, outs):
            print(p + o)
            if len(outs) > 1:
                print("-" * 40)
    return 0
