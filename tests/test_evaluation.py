"""The lm-eval plug-in ``qadapter`` against the reference, offline: a tiny random Llama, a local tokenizer,
lm-eval local json tasks. Its numbers must equal those computed directly from ``qk.reference.combined_logits``."""
import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import qadapter_kernels as qk  # noqa: E402
from qadapter_kernels.app import make_tasks  # noqa: E402
from qadapter_kernels.evaluation import PolicyScorer, checkers, metrics  # noqa: E402
from qadapter_kernels.evaluation.lm_eval_cli import SHIPPED_TASKS_DIR, lm_eval_arguments  # noqa: E402
from qadapter_kernels.evaluation.lm_eval_model import QAdapterLM  # noqa: E402
from qadapter_kernels.training import QAdapterConfig, QAdapterModel, shipped_data_path  # noqa: E402
from qadapter_kernels.training.data import tokenize_preference  # noqa: E402
from training_helpers import tiny_tokenizer  # noqa: E402

ALPHAS = dict(alpha_tilde=0.7, alpha_0=0.5)  # far from (1, 0): the combination matters
QUESTIONS = ["What is the capital of France?", "What is two plus two?", "the quick brown fox"]
CHOICES = ["Paris", "four", "jumps over", "dog"]


def _base_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _random_adapter(model: QAdapterModel) -> QAdapterModel:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (adapter == base): make the streams differ
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def model():
    config = QAdapterConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, **ALPHAS)
    return _random_adapter(QAdapterModel(_base_llama(), config))


def _write_task(tmp_path, name: str, records: list[dict], body: str) -> TaskManager:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")
    return TaskManager(include_path=str(tmp_path))


def _evaluate(lm, task_manager, task: str) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0)


def _multiple_choice_task(tmp_path) -> TaskManager:
    records = [{"question": q, "choices": CHOICES, "answer": i % len(CHOICES)} for i, q in enumerate(QUESTIONS)]
    body = ('output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    return _write_task(tmp_path, "tiny_mc", records, body)


def _all_logits(model: QAdapterModel, ids: list[int], adapter: bool) -> torch.Tensor:
    """[T, V] logits of the whole causal LM (adapter on or off): the plain, unfused path."""
    with torch.no_grad():
        if adapter:
            return model.peft_model(input_ids=torch.tensor([ids])).logits[0]
        with model.peft_model.disable_adapter():
            return model.peft_model(input_ids=torch.tensor([ids])).logits[0]


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str, adapter: bool) -> float:
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    q = _all_logits(model, whole[:-1], adapter=adapter)
    if adapter:
        base = _all_logits(model, whole[:-1], adapter=False)
        logits = qk.reference.combined_logits(q, base, alpha_tilde=model.qadapter_config.alpha_tilde,
                                              alpha_0=model.qadapter_config.alpha_0)
    else:
        logits = q.float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole)))


def _reference_greedy(model, tokenizer, context: str, max_new: int, until: list[str]) -> str:
    ids = tokenizer.encode(context)
    new = []
    for _ in range(max_new):
        q = _all_logits(model, ids, adapter=True)[-1:]
        base = _all_logits(model, ids, adapter=False)[-1:]
        token = int(qk.reference.combined_logits(q, base, **ALPHAS).argmax(-1))
        new.append(token)
        ids = ids + [token]
        if token == tokenizer.eos_token_id:
            break
        if any(s in tokenizer.decode(new, skip_special_tokens=True) for s in until):
            break
    text = tokenizer.decode(new, skip_special_tokens=True)
    ends = [i for i in (text.find(s) for s in until) if i >= 0]
    return text[:min(ends)] if ends else text


@pytest.mark.parametrize("use_adapter", [True, False])
def test_loglikelihoods_equal_the_reference(tmp_path, model, tokenizer, use_adapter):
    lm = QAdapterLM(model=model, tokenizer=tokenizer, use_adapter=use_adapter, batch_size=3)
    out = _evaluate(lm, _multiple_choice_task(tmp_path), "tiny_mc")
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            expected = _reference_loglikelihood(model, tokenizer, context, continuation, adapter=use_adapter)
            assert resp[0][0] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_adapter_changes_the_loglikelihoods(model, tokenizer):
    """The equality above is not vacuous: the combined policy differs from the base model here."""
    combined = _reference_loglikelihood(model, tokenizer, QUESTIONS[0], " Paris", adapter=True)
    base = _reference_loglikelihood(model, tokenizer, QUESTIONS[0], " Paris", adapter=False)
    assert abs(combined - base) > 1e-2


def test_greedy_generations_equal_the_reference(tmp_path, model, tokenizer):
    records = [{"question": q} for q in QUESTIONS]
    body = ('output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: ""\n'
            "generation_kwargs:\n  until: ['fox']\n  max_gen_toks: 6\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
    lm = QAdapterLM(model=model, tokenizer=tokenizer, batch_size=2)
    out = _evaluate(lm, _write_task(tmp_path, "tiny_gen", records, body), "tiny_gen")
    for sample in out["samples"]["tiny_gen"]:
        context = sample["arguments"][0][0]
        assert sample["resps"][0][0] == _reference_greedy(model, tokenizer, context, 6, ["fox"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """(base model folder, adapter folder, the adapter's model in memory)."""
    root = tmp_path_factory.mktemp("saved")
    base_dir, adapter_dir = root / "base", root / "adapter"
    _base_llama().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = QAdapterConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, **ALPHAS)
    model = _random_adapter(QAdapterModel(_base_llama(), config))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def test_loads_a_saved_adapter_and_a_base_only_model(saved, tokenizer):
    base_dir, adapter_dir, model = saved
    pairs = [(tokenizer.encode(QUESTIONS[0]), tokenizer.encode(" Paris", add_special_tokens=False))]
    from_disk = QAdapterLM(adapter=str(adapter_dir), base_model=str(base_dir))
    in_memory = QAdapterLM(model=model, tokenizer=tokenizer)
    # (log-likelihood, is_greedy) per pair; pytest.approx takes no tuples inside a list (pytest >= 9.2).
    (disk_ll, disk_greedy), = from_disk.scorer.continuation_logprobs(pairs)
    (memory_ll, memory_greedy), = in_memory.scorer.continuation_logprobs(pairs)
    assert disk_ll == pytest.approx(memory_ll) and disk_greedy == memory_greedy
    base_only = QAdapterLM(base_model=str(base_dir))
    expected = _reference_loglikelihood(model, tokenizer, QUESTIONS[0], " Paris", adapter=False)
    assert base_only.scorer.continuation_logprobs(pairs)[0][0] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_lm_eval_command_line_runs_the_plug_in(saved, tmp_path):
    from qadapter_kernels.app.cli import main as qadapter

    base_dir, adapter_dir, _ = saved
    assert qadapter(["lm-eval", "run", "--model", "qadapter", "--model_args", f"adapter={adapter_dir},base_model={base_dir}",
          "--tasks", "qadapter_retention", "--limit", "3", "--output_path", str(tmp_path)]) == 0
    (results,) = tmp_path.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["qadapter_retention"]
    assert 0.0 <= scores["acc,none"] <= 1.0


def test_rolling_loglikelihood_is_the_whole_texts(model, tokenizer):
    class Request:
        args = ("the quick brown fox",)

    lm = QAdapterLM(model=model, tokenizer=tokenizer, max_length=4)  # several windows
    tokens = tokenizer.encode("the quick brown fox", add_special_tokens=False)
    assert len(tokens) > 4
    expected = _reference_loglikelihood_ids(model, [tokenizer.bos_token_id], tokens)
    # Windows of 4 tokens see less context than the reference, so only the first window matches exactly.
    first = _reference_loglikelihood_ids(model, [tokenizer.bos_token_id], tokens[:4])
    (total,) = lm.loglikelihood_rolling([Request()])
    window_one = lm.scorer.continuation_logprobs([([tokenizer.bos_token_id], tokens[:4])])[0][0]
    assert window_one == pytest.approx(first, rel=1e-5, abs=1e-4)
    assert total < window_one < 0 and total != pytest.approx(expected, abs=0.0)
    full = QAdapterLM(model=model, tokenizer=tokenizer).loglikelihood_rolling([Request()])[0]
    assert full == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_bad_arguments_raise_naming_them(model, tokenizer):
    with pytest.raises(ValueError, match="adapter=DIR"):
        QAdapterLM()
    with pytest.raises(ValueError, match="unknown qadapter model_args"):
        QAdapterLM(model=model, tokenizer=tokenizer, pretrained="x")
    with pytest.raises(ValueError, match="use_adapter"):
        QAdapterLM(model=model, tokenizer=tokenizer, use_adapter="maybe")
    with pytest.raises(ValueError, match="tokenizer="):
        QAdapterLM(model=model)
    with pytest.raises(ValueError, match="batch_size"):
        QAdapterLM(model=model, tokenizer=tokenizer, batch_size="many")
    with pytest.raises(ValueError, match="batch_size"):
        QAdapterLM(model=model, tokenizer=tokenizer, batch_size=0)

    class Request:
        args = ("hello", {"do_sample": True, "until": ["\n"]})

    with pytest.raises(ValueError, match="greedily"):
        QAdapterLM(model=model, tokenizer=tokenizer).generate_until([Request()])
    with pytest.raises(ValueError, match="non-empty context"):
        QAdapterLM(model=model, tokenizer=tokenizer).scorer.continuation_logprobs([([], [5])])


def test_cli_adds_the_shipped_tasks():
    assert lm_eval_arguments(["run", "--tasks", "x"]) == ["run", "--tasks", "x", "--include_path",
                                                           str(SHIPPED_TASKS_DIR)]
    assert lm_eval_arguments(["run", "--include_path", "mine"]) == ["run", "--include_path", "mine"]


# ----------------------------------------------------------------------------- shipped tasks


def test_shipped_task_files_are_what_the_generator_writes(tmp_path):
    paths = make_tasks.write_tasks(tmp_path)
    for name, path in paths.items():
        assert path.read_bytes() == (SHIPPED_TASKS_DIR / path.name).read_bytes(), name


def test_retention_probe_is_large_and_disjoint_from_the_preference_data():
    items = checkers.read_task_records("retention")
    assert len(items) >= 300
    assert len({item["category"] for item in items}) >= 8
    for item in items:
        assert len({o.casefold() for o in item["options"]}) == 4 and 0 <= item["target"] < 4
    preference_prompts = set()
    for split in ("train", "heldout"):
        for line in shipped_data_path(split, "lowercase").read_text().splitlines():
            preference_prompts.add(json.loads(line)["prompt"][0]["content"].lower())
    categories = {item["category"] for item in items}
    # None of the probe's question kinds is asked in the preference data.
    stems = {item["question"].lower().split(" of ")[0].split(" is ")[0] for item in items}
    for prompt in preference_prompts:
        assert not any(prompt.startswith(stem + " ") for stem in stems if len(stem) > 12), (prompt, categories)
    targets = [item["target"] for item in items]
    assert min(targets.count(i) for i in range(4)) > len(items) / 8  # the answer is not always in one place


def test_retention_scoring_ignores_case_but_not_content():
    doc = {"question": "What is the chemical symbol of gold?", "options": ["Ag", "Au", "Fe", "Cu"], "target": 1}
    choices = checkers.retention_choices(doc)
    assert choices == ["Ag", "ag", "Au", "au", "Fe", "fe", "Cu", "cu"]
    # The lower-case spelling of the right answer wins: right on content, wrong "as written".
    lls = [-3.0, -9.0, -5.0, -0.5, -4.0, -9.0, -6.0, -9.0]
    assert checkers.retention_process_results(doc, [(v, False) for v in lls]) == {"acc": 1.0, "acc_cased": 0.0}
    # The model's own style is "as written" here: "Ag" wins, though "au" alone is the most probable choice.
    lls_as_written = [-0.1, -9.0, -5.0, -2.0, -4.0, -9.0, -6.0, -9.0]
    assert checkers.predicted_options(doc, lls_as_written) == (0, 0)
    # Options that are one word in every case ("went") are compared once: nothing double-counts.
    assert checkers.retention_choices({"options": ["went", "goed", "ran", "sat"]}) == ["went", "goed", "ran", "sat"]
    with pytest.raises(ValueError, match="log-likelihoods"):
        checkers.predicted_options(doc, lls[:-1])


def test_preference_checker_scores_greedy_answers():
    doc = {"prompt": "x", "preference": "lowercase"}
    assert checkers.preference_process_results(doc, ["the capital is paris."]) == {"satisfied": 1.0}
    assert checkers.preference_process_results(doc, ["The capital is Paris."]) == {"satisfied": 0.0}
    with pytest.raises(ValueError, match="no checker"):
        checkers.preference_process_results({"prompt": "x", "preference": "shouting"}, ["A"])


@pytest.mark.parametrize("preference", sorted(checkers.PREFERENCE_CHECKERS))
def test_each_preference_task_holds_its_held_out_prompts_and_is_scored_by_its_checker(preference):
    task = checkers.preference_task(preference)
    docs = list(TaskManager(include_path=str(SHIPPED_TASKS_DIR)).load_task_or_group([task])[task].test_docs())
    heldout = [json.loads(line) for line in shipped_data_path("heldout", preference).read_text().splitlines()]
    assert [d["prompt"] for d in docs] == [h["prompt"][0]["content"] for h in heldout]
    assert {d["preference"] for d in docs} == {preference}
    for doc, pair in zip(docs[:20], heldout):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert checkers.preference_process_results(doc, [chosen]) == {"satisfied": 1.0}
        assert checkers.preference_process_results(doc, [rejected]) == {"satisfied": 0.0}
    with pytest.raises(ValueError, match="preference must be one of"):
        checkers.read_task_records("preference", "shouting")


def test_shipped_tasks_run_through_lm_eval(model, tokenizer):
    """The shipped YAMLs load (package data, no path relative to the working directory) and score."""
    lm = QAdapterLM(model=model, tokenizer=tokenizer, batch_size=16, max_gen_toks=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["qadapter_retention", "qadapter_pref_lowercase"],
                                  task_manager=TaskManager(include_path=str(SHIPPED_TASKS_DIR)), limit=5,
                                  bootstrap_iters=0)
    assert set(out["results"]["qadapter_retention"]) >= {"acc,none", "acc_cased,none"}
    assert 0.0 <= out["results"]["qadapter_pref_lowercase"]["satisfied,none"] <= 1.0


# ----------------------------------------------------------------------------- the benchmark's metrics


@pytest.fixture(scope="module")
def chat_tokenizer():
    return tiny_tokenizer()


def test_retention_accuracy_equals_lm_evals_score_of_the_shipped_task(model, tokenizer):
    items = checkers.read_task_records("retention")[:12]
    lm = QAdapterLM(model=model, tokenizer=tokenizer, batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["qadapter_retention"], bootstrap_iters=0, limit=len(items),
                                  task_manager=TaskManager(include_path=str(SHIPPED_TASKS_DIR)))
    expected = out["results"]["qadapter_retention"]["acc,none"]
    assert metrics.retention_accuracy(lm.scorer, items) == pytest.approx(expected)


def test_mean_token_kl_is_zero_for_the_same_policy_and_matches_the_reference(model, chat_tokenizer):
    base = PolicyScorer(model, chat_tokenizer, adapter=False)
    policy = PolicyScorer(model, chat_tokenizer)
    pairs = [(chat_tokenizer.encode(q), chat_tokenizer.encode(" four.", add_special_tokens=False)) for q in QUESTIONS]
    assert metrics.mean_token_kl(base, base, pairs) == pytest.approx(0.0, abs=1e-6)
    expected, count = 0.0, 0
    for context, continuation in pairs:
        ids = context + continuation
        q, b = (_all_logits(model, ids[:-1], adapter=a)[len(context) - 1:] for a in (True, False))
        ref = torch.log_softmax(b.float(), -1)
        pol = torch.log_softmax(qk.reference.combined_logits(q, b, **ALPHAS), -1)
        expected += float((ref.exp() * (ref - pol)).sum())
        count += len(continuation)
    assert metrics.mean_token_kl(base, policy, pairs) == pytest.approx(expected / count, rel=1e-4)


def test_pair_accuracy_and_preference_satisfaction(model, chat_tokenizer):
    from qadapter_kernels.training import load_preferences

    examples = load_preferences(shipped_data_path("heldout", "lowercase"))[:6]
    scorer = PolicyScorer(model, chat_tokenizer)
    expected = 0
    for example in examples:
        pair = tokenize_preference(example, chat_tokenizer)
        chosen, rejected = (_reference_loglikelihood_ids(model, pair.prompt_ids, ids)
                            for ids in (pair.chosen_ids, pair.rejected_ids))
        expected += chosen > rejected
    assert metrics.pair_accuracy(scorer, examples) == pytest.approx(expected / len(examples))
    records = [{"prompt": "What is two plus two?", "preference": "lowercase"}] * 2
    rate, answers = metrics.preference_satisfaction(scorer, records, max_new_tokens=4)
    assert answers[0] == answers[1] and len(answers) == 2
    assert rate == float(checkers.PREFERENCE_CHECKERS["lowercase"](answers[0]))


def _reference_loglikelihood_ids(model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    q, b = (_all_logits(model, ids[:-1], adapter=a) for a in (True, False))
    logprobs = torch.log_softmax(qk.reference.combined_logits(q, b, **ALPHAS), -1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(context), len(ids)))
