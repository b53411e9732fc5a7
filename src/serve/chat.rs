//! Chat messages to a prompt (docs/DESIGN.md §19.4).
//!
//! A model whose `tokenizer_config.json` has a `chat_template` (a Jinja
//! template, as Hugging Face's `apply_chat_template` renders it: trim_blocks
//! and lstrip_blocks on, `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` and `raise_exception` defined) gets that template. A base
//! model, which has none (state-spaces/mamba-*), gets the plain template:
//!
//! ```text
//! {system}\n\n                  (only when there is a system message)
//! User: {content}\n\n
//! Assistant: {content}\n\n      (earlier answers)
//! ...
//! Assistant:                    (the model continues here)
//! ```
//!
//! with "\n\nUser:" as a stop string, so that a base model does not go on
//! to write the user's next turn. An answer is written back exactly as the
//! server sent it (its leading space included), so that the next turn's
//! prompt begins with this turn's prompt and answer token for token
//! whenever the tokenizer splits them the same way: the prefix cache then
//! holds the state after the answer, and the next turn costs only its new
//! tokens.

use std::path::Path;

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// How a conversation becomes a prompt.
pub enum ChatTemplate {
    /// The plain template of the module notes.
    Plain,
    /// A Jinja template from tokenizer_config.json.
    Jinja {
        env: minijinja::Environment<'static>,
        bos_token: String,
        eos_token: String,
    },
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChatTemplate::Plain => "ChatTemplate::Plain",
            ChatTemplate::Jinja { .. } => "ChatTemplate::Jinja",
        })
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// The plain template's stop string.
pub const PLAIN_STOP: &str = "\n\nUser:";

impl ChatTemplate {
    /// The template `dir/tokenizer_config.json` names, or the plain one when
    /// there is no such file or it has no `chat_template`.
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(ChatTemplate::Plain);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_tokenizer_config(&text, &path.display().to_string())
    }

    /// The template in a tokenizer_config.json's text; `file` names it in errors.
    pub fn from_tokenizer_config(text: &str, file: &str) -> Result<Self> {
        let bad = |message: String| Error::Format {
            file: file.to_string(),
            message,
        };
        let config: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(ChatTemplate::Plain),
            Some(serde_json::Value::String(s)) => s.clone(),
            // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    bad("\"chat_template\": a list without a \"default\" template".into())
                })?
                .to_string(),
            Some(other) => {
                return Err(bad(format!(
                    "\"chat_template\" must be a string or a list of named templates, got {other}"
                )))
            }
        };
        // bos_token / eos_token: a string, or an added token {"content": ...}
        let token = |name: &str| -> String {
            match config.get(name) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            }
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| bad(format!("\"chat_template\" is not a valid template: {e}")))?;
        Ok(ChatTemplate::Jinja {
            env,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// Stop strings the template adds to every chat request.
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            ChatTemplate::Plain => vec![PLAIN_STOP.to_string()],
            ChatTemplate::Jinja { .. } => Vec::new(),
        }
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    /// Errors name the message at fault.
    pub fn render(&self, messages: &[Message]) -> std::result::Result<String, String> {
        match self {
            ChatTemplate::Plain => render_plain(messages),
            ChatTemplate::Jinja {
                env,
                bos_token,
                eos_token,
            } => {
                let template = env.get_template(TEMPLATE_NAME).map_err(|e| e.to_string())?;
                template
                    .render(minijinja::context! {
                        messages => messages,
                        add_generation_prompt => true,
                        bos_token => bos_token,
                        eos_token => eos_token,
                    })
                    .map_err(|e| format!("the model's chat template failed: {e}"))
            }
        }
    }
}

fn render_plain(messages: &[Message]) -> std::result::Result<String, String> {
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" | "developer" => {
                prompt.push_str(&m.content);
                prompt.push_str("\n\n");
            }
            "user" => {
                prompt.push_str("User: ");
                prompt.push_str(&m.content);
                prompt.push_str("\n\n");
            }
            "assistant" => {
                // written back as sent: the model wrote "Assistant:" + " text"
                prompt.push_str("Assistant:");
                if !m.content.starts_with(char::is_whitespace) {
                    prompt.push(' ');
                }
                prompt.push_str(&m.content);
                prompt.push_str("\n\n");
            }
            other => {
                return Err(format!(
                "messages[{i}].role: \"{other}\" is not one of system, developer, user, assistant"
            ))
            }
        }
    }
    prompt.push_str("Assistant:");
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_plain_template_writes_turns_and_keeps_answers_as_sent() {
        let t = ChatTemplate::Plain;
        let turn1 = vec![msg("system", "Be brief."), msg("user", "Hi")];
        let p1 = t.render(&turn1).unwrap();
        assert_eq!(p1, "Be brief.\n\nUser: Hi\n\nAssistant:");
        let mut turn2 = turn1.clone();
        turn2.push(msg("assistant", " Hello there"));
        turn2.push(msg("user", "Bye"));
        let p2 = t.render(&turn2).unwrap();
        assert_eq!(
            p2,
            "Be brief.\n\nUser: Hi\n\nAssistant: Hello there\n\nUser: Bye\n\nAssistant:"
        );
        // the next turn extends the previous prompt and answer
        assert!(p2.starts_with(&(p1 + " Hello there")));
        let err = t.render(&[msg("tool", "x")]).unwrap_err();
        assert!(err.contains("messages[0].role"), "{err}");
    }

    #[test]
    fn a_jinja_template_from_tokenizer_config_renders_as_transformers_does() {
        // The ChatML template of many instruction-tuned models.
        let config = r#"{
            "eos_token": {"content": "<|im_end|>"},
            "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        }"#;
        let t = ChatTemplate::from_tokenizer_config(config, "tokenizer_config.json").unwrap();
        let p = t.render(&[msg("user", " Hi ")]).unwrap();
        assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert!(t.stop_strings().is_empty());
        let raising = r#"{"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"}"#;
        let t = ChatTemplate::from_tokenizer_config(raising, "c.json").unwrap();
        let err = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
        let broken = r#"{"chat_template": "{% for %}"}"#;
        let err = ChatTemplate::from_tokenizer_config(broken, "c.json").unwrap_err();
        assert!(err.to_string().contains("c.json"), "{err}");
        let none = ChatTemplate::from_tokenizer_config("{}", "c.json").unwrap();
        assert!(matches!(none, ChatTemplate::Plain));
    }
}
