"""One real command line per `edgellm` command, shown as the "Example:" section of its `--help`."""

from __future__ import annotations

EXAMPLES = {
    "build": "edgellm build --model out/student --profile rpi5-8gb --out dist/ --keys keys/ --version 1.0.0",
    "bundle inspect": "edgellm bundle inspect dist/assistant-1.0.0.bundle",
    "bundle pack": "edgellm bundle pack build/assistant --out dist/assistant-1.0.0.bundle",
    "bundle verify": "edgellm bundle verify dist/assistant-1.0.0.bundle --root keys/root.json --repo repo/",
    "completion": "edgellm completion bash --command edgellm-agent > ~/.edgellm-agent-complete.bash",
    "distill": "edgellm distill --teacher out/teacher --data corpus.txt --student-config student.json --out out/student",
    "eval": "edgellm eval --model out/student --reference out/teacher --data val.txt",
    "export": "edgellm export --model out/student --format gguf-q4_k_m --out out/student.gguf",
    "finetune": "edgellm finetune --model out/student --data notes.txt --lora-rank 8 --out out/adapter",
    "keys copy-online": "edgellm keys copy-online keys/ /srv/edgellm-server/keys",
    "keys init": "edgellm keys init keys/ --threshold 2 --count 3",
    "profiles detect": "edgellm profiles detect --name my-board --device-class sbc --out profiles/my-board.yaml",
    "profiles list": "edgellm profiles list --format json",
    "profiles show": "edgellm profiles show rpi5-8gb",
    "quickstart": "edgellm quickstart --workdir /tmp/edgellm-demo --fresh",
    "repo add": "edgellm repo add repo/ dist/assistant-1.0.0.bundle --keys keys/",
    "repo export": "edgellm repo export repo/ assistant-1.0.0.bundle --out usb/",
    "repo init": "edgellm repo init repo/ --keys keys/",
    "repo list": "edgellm repo list repo/",
    "repo refresh": "edgellm repo refresh repo/ --keys keys/",
    "repo remove": "edgellm repo remove repo/ assistant-1.0.0.bundle --keys keys/",
    "repo rotate-key": "edgellm repo rotate-key repo/ --keys keys/ --role timestamp",
    "train": "edgellm train --data corpus.txt --config tiny.json --out out/teacher --steps 2000",
}
