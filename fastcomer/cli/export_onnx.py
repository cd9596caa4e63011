"""`fastcomer export-onnx`: a checkpoint's encoder and incremental decoder step as ONNX."""
import argparse

from .arguments import check_model_limits, image_shape, input_file, load_checkpoint, max_len, output_folder, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export-onnx",
        help="write a checkpoint's encoder and incremental decoder step as ONNX (needs the `onnx` extra)",
        description="Write OUT_DIR/encoder.onnx (img, img_mask -> memory_kv, memory_mask: the features' "
        "cross-attention keys and values of every decoder layer) and OUT_DIR/decoder_step.onnx (tokens, position, "
        "memory_kv, memory_mask, self_keys, self_values, coverage -> logits and the new caches) for one batch size, image "
        "size and max_len (static shapes; pad images to the size). fastcomer.export.onnx_greedy_search drives them "
        "in onnxruntime.",
    )
    parser.add_argument("--checkpoint", type=input_file, required=True, help="a CoMER checkpoint (fastcomer.load_comer)")
    parser.add_argument("out_dir", type=output_folder, help="directory for the two .onnx files")
    parser.add_argument("--image-size", type=image_shape, default=(64, 256), help="HEIGHTxWIDTH (default: 64x256)")
    parser.add_argument("--batch", type=positive_int, default=1, help="images per call (default: %(default)s)")
    parser.add_argument("--max-len", type=max_len, default=200,
                        help="tokens per answer, start token included, at most the model's positions (default: %(default)s)")
    parser.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's)")
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..export import export_onnx
    from ..extras import require

    require("onnx", "onnx", "onnxscript", purpose="fastcomer export-onnx")
    model = load_checkpoint(args.parser, args.checkpoint)
    check_model_limits(args.parser, model, args.max_len)
    model = model.to(torch.float32)  # ONNX runtimes take the float32 graph
    paths = export_onnx(model, args.out_dir, args.batch, args.image_size, args.max_len, args.opset)
    for path in paths:
        print(path)
    return 0
