"""SFT anchored to its base model by the exact KL on the trained tokens, plus replay (ptx), with RegularizedSFTTrainer.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft.py --config recipes/configs/sft_kl.yaml
    python recipes/sft.py --config recipes/configs/sft_kl.yaml --sft_kl_coef 0.5    # flags override the YAML
"""

from _common import RecipeArguments, load_pretrain, load_splits, model_init_kwargs, model_path
from trl import ModelConfig, TrlParser, get_peft_config

from trl_regularizers import RegularizedSFTConfig, RegularizedSFTTrainer


def make_parser() -> TrlParser:
    return TrlParser((RecipeArguments, RegularizedSFTConfig, ModelConfig))


def main(script_args: RecipeArguments, training_args: RegularizedSFTConfig, model_args: ModelConfig):
    model_init_kwargs(training_args, model_args)
    train, test = load_splits(script_args, training_args, "completion")
    trainer = RegularizedSFTTrainer(
        model=model_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        peft_config=get_peft_config(model_args),
        pretrain_dataset=load_pretrain(script_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    trainer = main(*make_parser().parse_args_and_config())
    # Every rank past save_model, then the process group destroyed (see recipes/dpo.py).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
