"""Training-config loading and overrides, learning-rate parsing, and the tasks' prompts/rewards."""

from __future__ import annotations

import json
import math

import pytest

from entropy_lab.config import (
    EXPERIMENT_OVERRIDES,
    ExperimentConfig,
    apply_experiment_overrides,
    load_training_config,
    parse_learning_rates,
)
from entropy_lab.errors import ConfigError
from entropy_lab.tasks import (
    DEFAULT_TEMPLATE,
    ArithmeticTask,
    JsonlTask,
    Problem,
    load_rewards,
    load_task,
    tag_pref,
)

pytestmark = pytest.mark.cpu


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


# ----------------------------------------------------------------------------- training config


def test_load_tiny_training_config(tiny_checkpoint):
    cfg = load_training_config(tiny_checkpoint / "config.yaml")
    assert cfg["lr"] == pytest.approx(3e-4) and isinstance(cfg["lr"], float)
    assert isinstance(cfg["buffer_size"], int) and cfg["buffer_size"] > 0
    assert cfg["lora"]["target_modules"]
    assert cfg["entropy_probe"] == {"enabled": False}
    assert cfg["scheduler"] == {"dataset": "arithmetic"}


def test_experiment_overrides(tiny_checkpoint):
    cfg = load_training_config(tiny_checkpoint / "config.yaml")
    original = json.dumps(cfg, sort_keys=True)
    eta = 3e-7
    out = apply_experiment_overrides(cfg, eta)
    assert json.dumps(cfg, sort_keys=True) == original, "the input config must not change"
    assert out["lr"] == eta
    assert out["total_steps"] == 2 and out["save_every"] == 1
    assert out["buffer_size"] == EXPERIMENT_OVERRIDES["buffer_size"] == 128
    assert out["microbatch_size"] == EXPERIMENT_OVERRIDES["microbatch_size"] == 4
    assert out["entropy_probe"]["enabled"] is True
    assert out["simple_entropy_probe"]["enabled"] is False
    assert out["gns_probe"]["enabled"] is False
    for key in ("lora", "weight_decay", "num_generations", "temperature", "clip_eps"):
        assert out[key] == cfg[key], key

    sized = apply_experiment_overrides(cfg, eta, buffer_size=32, microbatch_size=8)
    assert (sized["buffer_size"], sized["microbatch_size"]) == (32, 8)
    with pytest.raises(ConfigError, match="lr must be finite and > 0"):
        apply_experiment_overrides(cfg, -eta)


def test_unknown_keys_warn_but_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-6\nbuffer_size: 8\nmy_custom_knob: 3\nanother: x\n")
    with pytest.warns(UserWarning, match="unknown keys ignored: another, my_custom_knob"):
        cfg = load_training_config(path)
    assert cfg["my_custom_knob"] == 3
    assert cfg["lr"] == 1e-6  # YAML 1.1 reads "1e-6" as a string; it is converted


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1e-6\nlora: [r, 8\nbuffer_size: 8\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad\.yaml at line \d+") as e:
        load_training_config(path)
    _one_line(e)


def test_config_file_not_found_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_training_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys to values, not list"):
        load_training_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_training_config(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr: -1.0e-5", "lr must be finite and > 0, got -1e-05"),
        ("lr: 0", "lr must be finite and > 0, got 0"),
        ("lr: abc", "lr must be a number, got 'abc'"),
        ("lr: .nan", "lr must be finite and > 0, got nan"),
        ("lr: true", "lr must be a number, got True"),
        ("lr: [1, 2]", "lr must be a number, got [1, 2]"),
        ("buffer_size: 2.5", "buffer_size must be an integer, got 2.5"),
        ("weight_decay: -0.1", "weight_decay must be finite and >= 0, got -0.1"),
    ],
)
def test_invalid_numeric_values(tmp_path, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"{line}\n")
    with pytest.raises(ConfigError) as e:
        load_training_config(path)
    text = _one_line(e)
    assert text == f"{path}: {message}"


def test_zero_allowed_where_non_negative(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 0\ngrad_clip: 0\ntop_k: 0\nbuffer_size: 16.0\n")
    cfg = load_training_config(path)
    assert cfg["weight_decay"] == 0.0 and cfg["top_k"] == 0
    assert cfg["buffer_size"] == 16 and isinstance(cfg["buffer_size"], int)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f'lr: 1.0e-6\nx: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"malformed YAML in .*evil\.yaml"):
        load_training_config(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- learning rates


def test_parse_learning_rates_ok():
    assert parse_learning_rates("1e-8,1e-7") == [1e-8, 1e-7]
    assert parse_learning_rates(" 1e-6 , 1e-8,1e-7 ") == [1e-8, 1e-7, 1e-6]
    assert parse_learning_rates([3e-7, 1e-7]) == [1e-7, 3e-7]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "--learning-rates: 'abc' is not a number (write e.g. 1e-8,1e-7,1e-6)"),
        ("1e-7,abc", "--learning-rates: 'abc' is not a number (write e.g. 1e-8,1e-7,1e-6)"),
        ("0", "--learning-rates: '0' must be a finite number > 0"),
        ("-1e-5", "--learning-rates: '-1e-5' must be a finite number > 0"),
        ("nan", "--learning-rates: 'nan' must be a finite number > 0"),
        ("inf", "--learning-rates: 'inf' must be a finite number > 0"),
        ("1e-7,1e-6,1e-7", "--learning-rates: duplicate values [1e-07]: list each η once"),
        ("1e-7,1.0e-7", "--learning-rates: duplicate values [1e-07]: list each η once"),
        ("", "--learning-rates: give at least one value, e.g. 1e-8,1e-7,1e-6"),
        (" , ", "--learning-rates: give at least one value, e.g. 1e-8,1e-7,1e-6"),
    ],
)
def test_parse_learning_rates_errors(text, message):
    with pytest.raises(ConfigError) as e:
        parse_learning_rates(text)
    assert _one_line(e) == message


def test_parse_learning_rates_list_errors():
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        parse_learning_rates([1e-7, math.inf])
    with pytest.raises(ConfigError, match="is not a number"):
        parse_learning_rates([None])


# ----------------------------------------------------------------------------- ExperimentConfig


def test_experiment_config_validation():
    cfg = ExperimentConfig(learning_rates="1e-6,1e-7")
    assert cfg.learning_rates == [1e-7, 1e-6]
    with pytest.raises(ConfigError, match=r"--num-repeats must be >= 2 \(got 1\)") as e:
        ExperimentConfig(learning_rates=[1e-6], num_repeats=1)
    assert "repeats" in _one_line(e)
    with pytest.raises(ConfigError, match="--dtype must be fp32, fp64 or bf16"):
        ExperimentConfig(learning_rates=[1e-6], dtype="fp16")
    with pytest.raises(ConfigError, match="temperature must be finite and > 0"):
        ExperimentConfig(learning_rates=[1e-6], temperature=0)
    with pytest.raises(ConfigError, match="eval_size must be >= 1"):
        ExperimentConfig(learning_rates=[1e-6], eval_size=0)


def test_experiment_config_from_the_tiny_setup(tiny_checkpoint):
    from entropy_lab.config import resolve_training_setup

    training = load_training_config(tiny_checkpoint / "config.yaml")
    setup = resolve_training_setup(tiny_checkpoint, tiny=True)
    cfg = ExperimentConfig.from_setup(setup, "1e-6", training, num_repeats=2)
    assert cfg.prompts == "arithmetic"
    assert cfg.num_generations == training["num_generations"]
    assert cfg.max_new_tokens == training["max_new_tokens"]
    assert cfg.buffer_size == 128 and cfg.microbatch_size == 4  # the seed's overrides
    assert cfg.loss_type == "dr_grpo" and cfg.reward == "exact_answer"
    explicit = resolve_training_setup(tiny_checkpoint, tiny=True, flags={"num_generations": "3"})
    assert ExperimentConfig.from_setup(explicit, [1e-6]).num_generations == 3
    assert explicit.sources["num_generations"] == "--num-generations"
    effective = cfg.effective()
    assert effective["training_config"]["total_steps"] == 2
    assert effective["training_config"]["entropy_probe"]["enabled"] is True
    assert "learning_rates" not in cfg.measurement_key()


# ----------------------------------------------------------------------------- tasks: rewards


def test_arithmetic_task_reward_exact_match():
    task = ArithmeticTask(max_operand=5)
    assert len(task.problems) == 25
    problem = Problem(prompt="3+4=", answer="7")
    assert problem in task.problems
    assert task.reward("7", problem) == 1.0  # the built-in exact_answer reward
    assert task.reward(" 7\n", problem) == 1.0  # surrounding whitespace is not an answer
    for wrong in ("8", "77", "07", "7.0", "", "seven", "7 8"):
        assert task.reward(wrong, problem) == 0.0, wrong


@pytest.mark.parametrize(
    ("response", "gold", "reward"),
    [
        ("reasoning</think><answer>72</answer>", "72", 1.0),
        ("<answer> 72 </answer>", "72", 1.0),
        ("<answer>The answer is 72.</answer>", "72", 1.0),
        ("<answer>-3</answer>", "-3", 1.0),
        ("<answer>1,234</answer>", "1234", 1.0),
        ("<answer>72.0</answer>", "72", 1.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("<answer>72</answer>", "9+63=72\n#### 72", 1.0),  # GSM8K's gold after ####
        ("<answer>72</answer> then <answer>72</answer>", "72", 0.0),
        ("<answer>71</answer><answer>72</answer>", "72", 0.0),
        # one block, wrong: RL_Practice's W_TAG = 0 gives the format nothing
        ("<answer>73</answer>", "72", 0.0),
        ("<answer>3</answer>", "-3", 0.0),
        ("72", "72", 0.0),
        ("<answer>no number</answer>", "72", 0.0),
        ("<answer>72", "72", 0.0),
    ],
)
def test_tag_pref_reward(response, gold, reward):
    assert tag_pref([response], [gold]) == [reward]


# ----------------------------------------------------------------------------- tasks: JSONL


QA_RECORDS = [
    {"question": "Ada has 9 pens and buys 63 more. How many pens?", "answer": "9+63=72\n#### 72"},
    {"question": "A box holds 12 eggs. How many in 3 boxes?", "answer": "12*3 = 36 #### 36"},
    {"question": "Tom had 1,300 stamps and got 234. Total?", "answer": "#### 1,534"},
    {"question": "  What is 5 minus 8?  ", "answer": "-3"},
]
TEXT_RECORDS = [
    {"text": "What is 8 times 9? <think>8*9 is 72</think><answer>72</answer>"},
    {"text": "Half of 50? <think>50/2</think> <answer> 25 </answer>"},
    {"text": "Sum of 1, 2 and 3? <think>1+2+3</think><answer>6</answer>"},
]


def _write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_question_answer_records(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", QA_RECORDS, extra_lines=["", "   "])
    with pytest.raises(ConfigError, match="needs the training prompt's template") as e:
        load_task(str(path))  # never a silent default template
    _one_line(e)
    task = load_task(str(path), DEFAULT_TEMPLATE, rewards=load_rewards("tag_pref"))
    assert [p.answer for p in task.problems] == ["72", "36", "1,534", "-3"]
    first = task.problems[0]
    assert first.prompt == DEFAULT_TEMPLATE.format(question=QA_RECORDS[0]["question"])
    assert "{question}" not in first.prompt and QA_RECORDS[0]["question"] in first.prompt
    assert task.problems[3].prompt == DEFAULT_TEMPLATE.format(question="What is 5 minus 8?")
    assert task.reward(" 9+63 is 72 </think><answer>72</answer>", first) == 1.0
    assert task.reward("<answer>1534</answer>", task.problems[2]) == 1.0
    assert task.reward("<answer>71</answer>", first) == 0.0


def test_jsonl_text_records_with_custom_template(tmp_path):
    path = _write_jsonl(tmp_path / "text.jsonl", TEXT_RECORDS)
    template = "Q: {question}\nA: <think>"
    task = load_task(str(path), template, rewards=load_rewards("tag_pref"))
    assert isinstance(task, JsonlTask)
    assert [p.prompt for p in task.problems] == [
        "Q: What is 8 times 9?\nA: <think>",
        "Q: Half of 50?\nA: <think>",
        "Q: Sum of 1, 2 and 3?\nA: <think>",
    ]
    assert [p.answer for p in task.problems] == ["72", "25", "6"]
    assert task.reward("9 eights</think><answer>72</answer>", task.problems[0]) == 1.0
    own = load_task(str(path))  # no template: the record's own prompt, up to <think>
    assert own.problems[0].prompt == "What is 8 times 9? <think>"
    # RL_Practice's gsm8k_r1_template wrapper, by name
    r1 = load_task(str(path), "r1")
    assert r1.problems[1].prompt.startswith("You are solving math problems.")
    assert r1.problems[1].prompt.endswith("\nQuestion: Half of 50?\nResponse: <think>")


def test_jsonl_template_errors(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", QA_RECORDS)
    with pytest.raises(ConfigError, match=r"must contain the placeholder \{question\}"):
        load_task(str(path), "Question: {q}\nAnswer:")
    # literal braces must be doubled for str.format; a single pair is a clear error
    with pytest.raises(ConfigError, match=r"cannot be filled with str\.format") as e:
        load_task(str(path), "Put the result in \\boxed{}. {question}")
    _one_line(e)
    task = load_task(str(path), "Put the result in \\boxed{{}}. {question}")
    assert task.problems[0].prompt.startswith("Put the result in \\boxed{}. Ada has")


def test_jsonl_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_task(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=r"prompt file .*empty\.jsonl holds no records"):
        load_task(str(empty))
    bad = _write_jsonl(tmp_path / "bad.jsonl", QA_RECORDS[:2], extra_lines=['{"question": "x",'])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: not valid JSON") as e:
        load_task(str(bad))
    _one_line(e)
    for i, (record, message) in enumerate(
        [
            ([1, 2], "each (line|record) must be a JSON object"),
            ({"question": "no answer"}, "record needs a 'prompt' column, 'question' and 'answer'"),
            ({"text": "q <answer>1</answer>"}, "a 'text' record must hold the question"),
            ({"text": "q <think>t</think><answer>1</answer><answer>2</answer>"}, "exactly one"),
        ]
    ):
        path = _write_jsonl(tmp_path / f"r{i}.jsonl", [TEXT_RECORDS[0], record])
        with pytest.raises(ConfigError, match=rf"r{i}\.jsonl:2: .*{message}"):
            load_task(str(path), DEFAULT_TEMPLATE)


def test_load_task_arithmetic_specs():
    assert len(load_task("arithmetic").problems) == 900
    assert len(load_task("arithmetic:4").problems) == 16
    for spec in ("arithmetic:x", "arithmetic:0"):
        with pytest.raises(ConfigError, match="write arithmetic or arithmetic:N"):
            load_task(spec)


# ----------------------------------------------------------------------------- tasks: split


@pytest.mark.parametrize("eval_size", [0, 1, 64, 899, 900])
def test_split_is_disjoint_and_covering(eval_size):
    task = ArithmeticTask()
    eval_set, pool = task.split(eval_size, seed=3)
    assert len(eval_set) == eval_size
    assert len(eval_set) + len(pool) == len(task.problems)
    assert not {p.prompt for p in eval_set} & {p.prompt for p in pool}
    assert {p.prompt for p in eval_set} | {p.prompt for p in pool} == {
        p.prompt for p in task.problems
    }
    assert task.split(eval_size, seed=3) == (eval_set, pool)  # deterministic per seed


def test_split_depends_on_seed_and_handles_jsonl(tmp_path):
    task = ArithmeticTask()
    assert task.split(64, seed=0)[0] != task.split(64, seed=1)[0]
    jsonl = load_task(
        str(_write_jsonl(tmp_path / "qa.jsonl", QA_RECORDS + TEXT_RECORDS)), DEFAULT_TEMPLATE
    )
    eval_set, pool = jsonl.split(2, seed=0)
    assert len(eval_set) == 2 and len(pool) == 5
    assert sorted(map(id, eval_set + pool)) == sorted(map(id, jsonl.problems))
