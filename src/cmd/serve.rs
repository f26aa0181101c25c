//! `rbee serve`: the OpenAI-compatible API over the fleet, in the foreground, and `serve key`:
//! its API keys (made, listed, revoked; a key is shown once, when it is made).

use crate::cli::{KeyCommand, ServeArgs, ServeCommand};
use crate::cmd::Context;
use crate::error::Result;
use crate::serve::keys;

pub(crate) fn run(ctx: &Context, args: ServeArgs) -> Result<()> {
    match args.command {
        Some(ServeCommand::Key { command }) => key(ctx, command),
        None => crate::serve::run(crate::serve::Settings {
            listen: args.listen,
            max_queue: args.max_queue,
            drain: args.drain,
            connect: ctx.connect,
            config: ctx.config()?,
        }),
    }
}

fn key(ctx: &Context, command: KeyCommand) -> Result<()> {
    let path = keys::path();
    match command {
        KeyCommand::Create { name } => {
            let (key, record) = keys::create(&path, &name)?;
            ctx.audit_note(
                "serve_key_created",
                None,
                serde_json::json!({ "name": record.name }),
            );
            ctx.out.result(
                &serde_json::json!({ "name": record.name, "key": key, "created": record.created }),
                || key.clone(),
            );
            if !ctx.out.json {
                ctx.out.note(format!(
                    "key `{}` made; it is not shown again (only its hash is kept)",
                    record.name
                ));
            }
        }
        KeyCommand::List => {
            let list = keys::list(&path)?;
            let rows: Vec<_> = list
                .iter()
                .map(|k| serde_json::json!({ "name": k.name, "created": k.created }))
                .collect();
            ctx.out.result(&serde_json::json!({ "keys": rows }), || {
                list.iter()
                    .map(|k| format!("{}\t{}\n", k.name, k.created))
                    .collect()
            });
        }
        KeyCommand::Revoke { name } => {
            keys::revoke(&path, &name)?;
            ctx.audit_note(
                "serve_key_revoked",
                None,
                serde_json::json!({ "name": name }),
            );
            ctx.out.note(format!("key `{name}` revoked"));
        }
    }
    Ok(())
}
