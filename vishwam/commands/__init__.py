"""The command lines, inside the package so that an installed wheel has them.

Each module has `main(argv=None) -> exit code` and `entry()` (the console command):

    train            vishwam-train            train a model (the main job; resumes a run)
    distill          vishwam-distill          distil a run into a smaller student
    generate         vishwam-generate         complete a prompt with a pipeline, a run or an HF directory
    report           vishwam-report           summarise runs: losses, throughput, memory, events, a picture
    plan             vishwam-plan             will it fit: compile the train step for a TPU pod or GPU nodes
    convert_hf       vishwam-convert-hf       HuggingFace safetensors <-> a vishwam pipeline
    prepare_data     vishwam-prepare-data     stream a large corpus into a token cache
    train_tokenizer  vishwam-train-tokenizer  train a SentencePiece tokenizer
    serve            vishwam-serve            an OpenAI-compatible server with continuous batching
    upcycle          vishwam-upcycle          a dense model -> a MoE whose experts copy its MLPs

`python -m vishwam COMMAND ...` runs the same (`-` or `_` in the name); `scripts/*.py` are
wrappers of these modules, so `python scripts/train.py` keeps working in a checkout.
"""

COMMANDS = ("train", "distill", "generate", "report", "plan", "convert_hf", "prepare_data", "train_tokenizer",
            "upcycle", "serve")
