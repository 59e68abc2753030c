"""PPO with KL options, adaptive KL and PPO-ptx (eq. 6) with RegularizedPPOTrainer, on any supported TRL (no [ppo] pin).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/ppo.py --config recipes/configs/ppo_ptx.yaml
"""

from _common import TINY, RecipeArguments, load_pretrain, load_splits, model_path
from trl import ModelConfig, TrlParser, get_peft_config

from trl_regularizers import RegularizedPPOConfig, RegularizedPPOTrainer


def make_parser() -> TrlParser:
    return TrlParser((RecipeArguments, RegularizedPPOConfig, ModelConfig))


def main(script_args: RecipeArguments, training_args: RegularizedPPOConfig, model_args: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy_path = model_path(model_args.model_name_or_path)
    # 'tiny-world': a reward/value model initialized from the policy's weights (score head untrained), offline.
    reward_path = policy_path if script_args.reward_model_name_or_path == TINY else script_args.reward_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    load = dict(dtype=model_args.dtype)
    train, test = load_splits(script_args, training_args, "prompt")

    def tokenize(dataset):
        return None if dataset is None else dataset.map(lambda row: tokenizer(row["prompt"], add_special_tokens=False), remove_columns=dataset.column_names)

    trainer = RegularizedPPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(policy_path, **load),
        ref_model=None if model_args.use_peft else AutoModelForCausalLM.from_pretrained(policy_path, **load),
        reward_model=AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, **load),
        value_model=AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, **load),
        train_dataset=tokenize(train),
        eval_dataset=tokenize(test),
        peft_config=get_peft_config(model_args),
        pretrain_dataset=load_pretrain(script_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    trainer = main(*make_parser().parse_args_and_config())
    # Every rank past save_model, then the process group destroyed: a rank that tears gloo down while another
    # still saves can abort ("terminate called without an active exception", torch 2.13).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
