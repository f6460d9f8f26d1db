//! How many guests a server can give an address: `servers.address_slots`, from the subnet (or
//! range) its agent reports, written with them at registration. A reservation's conditional
//! update checks it, so that cores whose views of a small subnet were read apart cannot
//! together place more containers there than it has addresses (its agent would refuse the
//! extra ones). Null where unknown (no subnet reported: no such bound).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::big_integer_null;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let add = Table::alter()
            .table("servers")
            .add_column(big_integer_null("address_slots"))
            .to_owned();
        manager.alter_table(add).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let drop = Table::alter()
            .table("servers")
            .drop_column("address_slots")
            .to_owned();
        manager.alter_table(drop).await
    }
}
